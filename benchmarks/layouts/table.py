import json, numpy as np, pathlib
import sys
d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/layouts")
L = ["1x1", "1x4", "2x2"]
r = {l: dict(np.load(d / f"{l}.npz")) for l in L}
for l in L:
    r[l]["drift"] = (r[l]["drift"].view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 saved raw
j = {l: json.load(open(d / f"{l}.json")) for l in L}
print("| example | " + " | ".join(f"objective {l}" for l in L) + " | recovered (1x1/1x4/2x2) | clamped objective | drift_rel 1x1 |")
print("|---|" + "---|" * (len(L) + 3))
for i in range(len(r["1x1"]["objective"])):
    print(f"| {i} | " + " | ".join(f"{r[l]['objective'][i]:.6f}" for l in L)
          + f" | {'/'.join(str(bool(r[l]['success'][i])) for l in L)} | {r['1x1']['clamped'][i]:.4f} | {r['1x1']['drift'][i]:.2e} |")
for l in L[1:]:
    rel = lambda k: float(np.max(np.abs(r[l][k] - r["1x1"][k]) / np.maximum(np.abs(r["1x1"][k]), 1e-30)))
    absd = lambda k: float(np.max(np.abs(r[l][k] - r["1x1"][k])))
    print(f"{l} vs 1x1: objective max rel {rel('objective'):.2e}; delta max abs {absd('delta'):.2e} (|delta| max {np.abs(r['1x1']['delta']).max():.3f}, "
          f"rel to max {absd('delta')/np.abs(r['1x1']['delta']).max():.2e}); generated tokens equal: {bool((r[l]['gen']==r['1x1']['gen']).all())}; success equal {bool((r[l]['success']==r['1x1']['success']).all())}")
print("| layout | devices | processes | load s | solve s | generate s | total s |")
print("|---|---|---|---|---|---|---|")
for l in L:
    x = j[l]
    print(f"| {l} | {x['devices']} | {x['processes']} | {x['load_s']:.1f} | {x['solve_s']:.1f} | {x['generate_s']:.1f} | {x['total_s']:.1f} |")
print("seq", j["1x1"]["seq"], "rows", j["1x1"]["rows"])
