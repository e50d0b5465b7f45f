"""The user-facing error: what is wrong (the file or flag), and the fix — printed as one line.

Loaders and validators raise `UserError`; every command-line entry point runs its main through
`cli_main`, which prints `<program>: error: <message>` on one line and exits with status 2 (no
traceback; set EDM2_JAX_TRACEBACK=1 to see it when debugging). It also logs at WARNING unless
--verbosity is given: at absl's default INFO, orbax logs every file it reads or writes and JAX its
platform probing (`Unable to initialize backend 'tpu'`).
"""
from __future__ import annotations

import functools
import os
import sys
import traceback

TRACEBACK_ENV = 'EDM2_JAX_TRACEBACK'
EXIT_STATUS = 2


class UserError(ValueError):
    """A bad input: `where` (a file, a flag, a field), `problem`, `fix` (what to do), as one line.

    A ValueError, so callers that caught ValueError before still catch it.
    """

    def __init__(self, problem: str, *, where: str | None = None, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        text = problem if where is None else f'{where}: {problem}'
        if fix:
            text = f'{text} ({fix})'
        super().__init__(text)


def cli_main(program: str, *, catch: tuple[type[BaseException], ...] = ()):
    """Decorator for an absl main: logging at WARNING unless --verbosity is given; UserError (and
    `catch`) → one line on stderr, exit 2; Ctrl-C → one line, exit 130."""
    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv):
            _quiet_logging()
            try:
                return main(argv)
            except (UserError, *catch) as e:
                _report(program, e)
                sys.exit(EXIT_STATUS)
            except KeyboardInterrupt:
                if os.environ.get(TRACEBACK_ENV):
                    traceback.print_exc()
                print(f'{program}: interrupted', file=sys.stderr)
                sys.exit(130)
        return wrapper
    return decorate


def _quiet_logging():
    from absl import flags, logging
    if 'verbosity' in flags.FLAGS and not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)


def _report(program, error):
    if os.environ.get(TRACEBACK_ENV):
        traceback.print_exc()
    message = ' '.join(str(error).split())  # one line
    print(f'{program}: error: {message}', file=sys.stderr)
