"""Printing a bench result with rich."""

from __future__ import annotations

from .measure import PHASES


def busy_warning(machine: dict) -> str | None:
    """A warning when other processes used a noticeable share of the CPU, else None."""
    cores = machine.get("cores") or 1
    ext = machine.get("external_load_cores")
    load = (machine.get("loadavg_before") or [0.0])[0]
    if (ext is not None and ext > 0.2) or load > 0.5 * cores:
        ext_text = f"{ext:.2f} cores" if ext is not None else "unknown"
        return (
            f"the machine was busy (load average {load:.2f} before the run, other processes "
            f"used {ext_text} of {cores} during it): these numbers are unreliable"
        )
    return None


def _type_gflops(t: dict, peak: dict | None) -> str:
    """', fwd/bwd 112/98 GFLOP/s = 50%/43% of peak' for a type whose layers compute products."""
    fwd, bwd = t.get("forward_gflops", 0.0), t.get("backward_gflops", 0.0)
    if not fwd:
        return ""
    text = f", fwd/bwd {fwd:.0f}/{bwd:.0f} GFLOP/s"
    if peak and peak.get("gflops"):
        text += f" = {fwd / peak['gflops']:.0%}/{bwd / peak['gflops']:.0%} of peak"
    return text


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _type_cell(row: dict) -> str:
    """The layer's type, and where a conv ran Winograd F(4x4, 3x3): in which passes."""
    passes = row.get("winograd") or []
    if not passes:
        return row["type"]
    which = "" if len(passes) == 3 else ": " + ", ".join(passes)
    return f"{row['type']} [cyan](Winograd{which})[/]"


def render_bench(result: dict, console, top: int = 5) -> None:
    from rich.table import Table

    from ..report import human

    th = result["threads"]
    blas = th["blas"] if th["blas"] is not None else "?"
    console.print(
        f"[bold]{result['name']}[/]  batch {result['batch']}, threads: numba "
        f"{th['numba']}, BLAS {blas}; median of {result['repeat']} runs after "
        f"{result['warmup']} warm-up; {human(result['macs_per_image'])} MACs/image, "
        f"{result['params']:,} params"
    )
    table = Table(title_justify="left", pad_edge=False)
    for col in ("phase", "ms/batch", "min ms", "images/s", "GFLOP/s", "of peak"):
        table.add_column(col, justify="left" if col == "phase" else "right", no_wrap=True)
    for key, label, _ in PHASES:
        p = result[key]
        share = f"{p['peak_share']:.1%}" if p["peak_share"] is not None else "-"
        table.add_row(
            label,
            _fmt_ms(p["median_ms"]),
            _fmt_ms(p["min_ms"]),
            f"{p['images_per_s']:,.0f}",
            f"{p['gflops']:.1f}",
            share,
        )
    console.print(table)
    rows = result["layers"]
    if rows:
        lt = Table(
            title="per layer (medians; fwd and bwd in train mode, the loss in its "
            "output layer's fwd)",
            title_justify="left",
            pad_edge=False,
        )
        for col in (
            "layer",
            "type",
            "fwd ms",
            "bwd ms",
            "total ms",
            "share",
            "eval ms",
            "fwd GFLOP/s",
            "bwd GFLOP/s",
        ):
            lt.add_column(
                col, justify="left" if col in ("layer", "type") else "right", no_wrap=True
            )
        for r in rows:
            if not r["ran"]:
                what = f"fused into {r['fused_into']}" if r["fused_into"] else "not run"
                lt.add_row(r["name"], r["type"], f"[dim]{what}[/]", "", "", "", "", "", "")
                continue
            bar = "#" * round(r["share"] * 20)
            lt.add_row(
                r["name"],
                _type_cell(r),
                _fmt_ms(r["forward_ms"]),
                _fmt_ms(r["backward_ms"]),
                _fmt_ms(r["total_ms"]),
                f"{r['share']:6.1%} [cyan]{bar:<20}[/]",
                # a batch norm folded into the conv before it, or a residual add run in
                # that conv's epilogue, has no eval pass of its own
                _fmt_ms(r["eval_ms"]) if r["eval_ms"] else "[dim]in conv[/]",
                f"{r['forward_gflops']:.1f}" if r["macs"] else "-",
                f"{r['backward_gflops']:.1f}" if r["macs"] and r["backward_ms"] else "-",
            )
        lt.add_row(
            "[bold]total[/]",
            "",
            _fmt_ms(sum(r["forward_ms"] for r in rows)),
            _fmt_ms(sum(r["backward_ms"] for r in rows)),
            _fmt_ms(result["layers_total_ms"]),
            "",
            _fmt_ms(sum(r["eval_ms"] for r in rows)),
            "",
            "",
        )
        console.print(lt)
        ranked = sorted(rows, key=lambda r: -r["total_ms"])[:top]
        console.print(
            "top layers: "
            + ", ".join(f"{r['name']} {r['share']:.0%}" for r in ranked)
            + f"  [dim](layers account for {result['layers_coverage']:.0%} of a "
            "train pass; the rest is the model's own bookkeeping)[/]"
        )
        console.print(
            "by type: "
            + ", ".join(
                f"{k} {v['share']:.0%} (fwd {v['forward_ms']:.1f} + bwd {v['backward_ms']:.1f} ms"
                + _type_gflops(v, result["peak"])
                + ")"
                for k, v in result["by_type"].items()
                if v["share"] >= 0.005
            )
        )
    peak = result["peak"]
    if peak:
        console.print(
            f"GEMM peak: {peak['gflops']:.1f} GFLOP/s, the better of cnnspec's "
            f"micro-kernel ({peak['kernel_gflops']:.1f}) and a numpy float32 {peak['n']}x"
            f"{peak['n']} matmul ({peak['blas_gflops']:.1f}, {peak['blas_threads'] or '?'} "
            "BLAS threads); best of a few each"
        )
    c = result["cold_start"]
    cache = {
        "warm": f"Numba cache warm: {c['kernels_loaded']} kernels loaded from disk",
        "cold": f"Numba cache cold: {c['kernels_compiled']} kernels compiled",
        "partial": f"Numba cache partly warm: {c['kernels_loaded']} kernels loaded, "
        f"{c['kernels_compiled']} compiled",
        "in-process": "kernels were already compiled in this process: not a cold start",
        "stand-ins": "no kernel compiled or loaded yet: numpy stand-ins ran it while a "
        "child process compiles them",
    }.get(c["numba_cache"], "Numba cache state unknown")
    console.print(
        f"cold start: compile {c['compile_s'] * 1e3:.0f} ms + first step "
        f"{c['first_step_s']:.2f} s = {c['total_s']:.2f} s ({cache})"
    )
    warning = busy_warning(result["machine"])
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
