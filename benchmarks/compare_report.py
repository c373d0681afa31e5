"""compare.py's tables: each configuration's median step, spread, warm-up and peak memory against the reference's
and the bare step's, and the headline (adapt at its defaults against the reference at its own)."""

from __future__ import annotations

import statistics


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(results: dict) -> None:
    print(f"\n{'method':<10} {'res':>4} {'prec':<5} {'mode':<22} {'s/step':>7} {'range':>13} {'warm-up s':>9} {'peak MB':>8} "
          f"{'vs ref':>7} {'vs bare':>7} {'mem vs ref':>10}")
    for (method, res, prec), by_mode in results.items():
        ok = {m: rows for m, rows in by_mode.items() if rows and "error" not in rows[0]}
        ref, bare = ok.get("reference"), ok.get("bare")
        for mode, rows in by_mode.items():
            if mode not in ok:
                print(f"{method:<10} {res:>4} {prec:<5} {mode:<22} failed: {rows[0].get('error', '?')[:80]}")
                continue
            s, mem = _median(rows, "median_s"), _median(rows, "peak_mb")
            spread = f"{min(r['min_s'] for r in rows):.2f}-{max(r['max_s'] for r in rows):.2f}"
            vs_ref = f"{s / _median(ref, 'median_s'):.2f}x" if ref else "-"
            vs_bare = f"{s / _median(bare, 'median_s'):.2f}x" if bare else "-"
            mem_ref = f"{mem / _median(ref, 'peak_mb'):.2f}x" if ref else "-"
            warm = _median(rows, "warmup_s")  # the --warmup steps together: compiling, first allocations
            print(f"{method:<10} {res:>4} {prec:<5} {mode:<22} {s:>7.2f} {spread:>13} {warm:>9.1f} {mem:>8.0f} {vs_ref:>7} "
                  f"{vs_bare:>7} {mem_ref:>10}")


def headline(results: dict) -> None:
    """adapt at its defaults (--mixed-precision auto on this machine) against the reference at its own (fp32)."""
    from adapt.precision import choose

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for (method, res, prec), by_mode in results.items():
        if prec != "fp32" or "reference" not in by_mode or "error" in by_mode["reference"][0]:
            continue
        params = by_mode["reference"][0]["unet_params"]
        picked = choose("auto", device, params)[0]
        auto = "fp32" if picked == "no" else picked
        adapt = results.get((method, res, auto), {}).get("adapt")
        if not adapt or "error" in adapt[0]:
            print(f"{method} {res} px: adapt at auto = {auto} was not measured")
            continue
        ref = by_mode["reference"]
        print(f"{method} {res} px: adapt at its defaults (auto = {auto}) / the reference at its defaults (fp32): "
              f"step {_median(adapt, 'median_s') / _median(ref, 'median_s'):.2f}x, "
              f"peak memory {_median(adapt, 'peak_mb') / _median(ref, 'peak_mb'):.2f}x")


def summarise(rows: list[dict]) -> None:
    results: dict = {}
    for r in rows:
        results.setdefault((r["method"], r["res"], r["precision"]), {}).setdefault(r["label"], []).append(r)
    report(results)
    print()
    headline(results)
