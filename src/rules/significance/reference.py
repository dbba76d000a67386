"""Reference values for src/stats/tests.rs, from scipy (run: python3 src/stats/reference.py)."""
import math
import numpy as np
import scipy
from scipy import stats

print("// scipy", scipy.__version__, "numpy", np.__version__)

print("// normal_sf")
for z in [-3.0, -1.0, 0.0, 0.5, 1.959964, 3.090232, 5.0, 8.0]:
    print(f"({z!r}, {float(stats.norm.sf(z))!r}),")

print("// student_t_sf")
for t, df in [(0.5, 3.0), (2.0, 5.0), (-1.5, 10.0), (3.0, 2.5), (2.5, 30.7), (4.0, 200.0),
              (1.0, 1.0), (6.0, 12.0), (2.0, 5000.0), (-4.0, 7.3), (0.0, 4.0), (3.5, 123456.0)]:
    print(f"({t!r}, {df!r}, {float(stats.t.sf(t, df))!r}),")

def expand(h):
    return np.repeat([v for v, _ in h], [c for _, c in h]).astype(float)

print("// mann_whitney_greater")
cases = [
    ([(10, 5), (20, 3), (30, 7)], [(10, 4), (15, 2), (20, 6), (25, 1)]),
    ([(1, 1), (2, 1), (3, 1)], [(4, 1), (5, 1), (6, 1)]),
    ([(4, 1), (5, 1), (6, 1)], [(1, 1), (2, 1), (3, 1)]),
    ([(100, 40), (200, 30), (300, 30)], [(100, 50), (200, 30), (300, 20)]),
    ([(v, 1 + v % 7) for v in range(50, 150)], [(v, 1 + v % 5) for v in range(0, 120)]),
    ([(7, 3)], [(7, 2), (8, 1)]),
]
for a, b in cases:
    r = stats.mannwhitneyu(expand(a), expand(b), alternative="greater", method="asymptotic",
                           use_continuity=True)
    shown = lambda h: repr(h) if len(h) < 10 else "<generated, see the test>"
    print(f"({shown(a)}, {shown(b)}, {float(r.pvalue)!r}),")

print("// welch_less: (mean_a, var_a, n_a, mean_b, var_b, n_b, p)")
for ma, va, na, mb, vb, nb in [(0.70, 0.01, 50, 0.72, 0.012, 60), (0.5, 0.04, 10, 0.6, 0.01, 8),
                               (0.8, 0.02, 200, 0.7, 0.03, 150), (1.0, 4.0, 3, 2.0, 0.25, 40),
                               (0.6, 0.0, 30, 0.65, 0.01, 30)]:
    r = stats.ttest_ind_from_stats(ma, math.sqrt(va), na, mb, math.sqrt(vb), nb,
                                   equal_var=False, alternative="less")
    print(f"({ma!r}, {va!r}, {na}, {mb!r}, {vb!r}, {nb}, {float(r.pvalue)!r}),")

print("// proportion_greater: (x1, n1, x2, n2, p)")
for x1, n1, x2, n2 in [(12, 100, 5, 100), (3, 50, 3, 50), (1, 200, 10, 200), (30, 1000, 10, 1000),
                       (8, 60, 2, 400)]:
    p = (x1 + x2) / (n1 + n2)
    z = (x1 / n1 - x2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    print(f"({x1}, {n1}, {x2}, {n2}, {float(stats.norm.sf(z))!r}),")
