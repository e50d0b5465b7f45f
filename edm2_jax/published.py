"""NVIDIA's published EDM2 sampling settings (generate_images.py's presets): name → the network,
its guide, the guidance method and g. Files are the NVIDIA pickles' names without .pkl; convert each
with `python -m convert.edm2 --src=NAME.pkl --dst=CHECKPOINTS/NAME`.

("Preset" alone means an architecture preset, `config.py`; these are named PUBLISHED.)
"""
from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    net: str
    gnet: str | None
    method: str        # 'none', 'cfg' or 'autoguidance'
    guidance: float    # g, EDM2's convention (1 = none)


def _table() -> dict[str, Published]:
    p = {}
    unguided = {'img512-xs': ('2147483', '0.135', '0.200'), 'img512-s': ('2147483', '0.130', '0.190'),
                'img512-m': ('2147483', '0.100', '0.155'), 'img512-l': ('1879048', '0.085', '0.155'),
                'img512-xl': ('1342177', '0.085', '0.155'), 'img512-xxl': ('0939524', '0.070', '0.150')}
    for model, (kimg, fid, dino) in unguided.items():
        p[f'edm2-{model}-fid'] = Published(f'edm2-{model}-{kimg}-{fid}', None, 'none', 1.0)
        p[f'edm2-{model}-dino'] = Published(f'edm2-{model}-{kimg}-{dino}', None, 'none', 1.0)
    for model, kimg, std in (('img64-s', '1073741', '0.075'), ('img64-m', '2147483', '0.060'),
                             ('img64-l', '1073741', '0.040'), ('img64-xl', '0671088', '0.040')):
        p[f'edm2-{model}-fid'] = Published(f'edm2-{model}-{kimg}-{std}', None, 'none', 1.0)
    guided = {'xs': ('2147483', '0.045', 1.40, '0.150', 1.70), 's': ('2147483', '0.025', 1.40, '0.085', 1.90),
              'm': ('2147483', '0.030', 1.20, '0.015', 2.00), 'l': ('1879048', '0.015', 1.20, '0.035', 1.70),
              'xl': ('1342177', '0.020', 1.20, '0.030', 1.70), 'xxl': ('0939524', '0.015', 1.20, '0.015', 1.70)}
    for size, (kimg, fid, g_fid, dino, g_dino) in guided.items():
        for metric, std, g in (('fid', fid, g_fid), ('dino', dino, g_dino)):
            p[f'edm2-img512-{size}-guid-{metric}'] = Published(
                f'edm2-img512-{size}-{kimg}-{std}', f'edm2-img512-xs-uncond-2147483-{std}', 'cfg', g)
    for name, net, gnet, g in (
            ('img512-s-autog-fid', 'img512-s-2147483-0.070', 'img512-xs-0134217-0.125', 2.10),
            ('img512-s-autog-dino', 'img512-s-2147483-0.120', 'img512-xs-0134217-0.165', 2.45),
            ('img512-xxl-autog-fid', 'img512-xxl-0939524-0.075', 'img512-m-0268435-0.155', 2.05),
            ('img512-xxl-autog-dino', 'img512-xxl-0939524-0.130', 'img512-m-0268435-0.205', 2.30),
            ('img512-s-uncond-autog-fid', 'img512-s-uncond-2147483-0.070', 'img512-xs-uncond-0134217-0.110', 2.85),
            ('img512-s-uncond-autog-dino', 'img512-s-uncond-2147483-0.090', 'img512-xs-uncond-0134217-0.125', 2.90),
            ('img64-s-autog-fid', 'img64-s-1073741-0.045', 'img64-xs-0134217-0.110', 1.70),
            ('img64-s-autog-dino', 'img64-s-1073741-0.105', 'img64-xs-0134217-0.175', 2.20)):
        p[f'edm2-{name}'] = Published(f'edm2-{net}', f'edm2-{gnet}', 'autoguidance', g)
    return p


PUBLISHED: dict[str, Published] = _table()
