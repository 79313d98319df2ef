"""Paper-style report: every method at N_u ∈ {25, 75, 125}, repeated over edit samples, plus the
gradient conflict (GCR) and magnitude similarity (GMS) per layer (the paper's Table 5).

    python python/report.py                  # CounterFact from $DCEDIT_DATA_DIR, else ../shared/data
    python python/report.py --data my-val.json --train-data my-train.json --repeats 3 \\
        --markdown RESULTS.md --out-dir report_out

1. Trains MEND, MoEditor and ProEditor editors on the first edits of --train-data (cached like
   the demo's, see `dcedit_kernels.editor_cache.trained_editor`); a training edit whose locality
   prompt an evaluated edit is scored on is trained without it (`without_scored_locality`), so
   that DD is never scored on a prompt the editors' KL was fitted to.  RaEditor, as in the demo, is
   MoEditor's editors with random routing (`dcedit_kernels.editor_cache.random_routing_twin`).
2. For each method runs `dcedit_kernels.evaluate.evaluate_method` on --data: for each N_u,
   --repeats samples of N_u edits (the same samples for every method), each applied as one batch,
   scored and undone; mean ± std over the samples.  `--fusions add,ssm` adds rows for RaEditor
   and MoEditor applied with those fusions (the same trained editors: training's locality rows
   see the sum of the group shifts whatever the fusion, see `dcedit_kernels.train`).
3. For each N_u, on that N_u's first sample, GCR and GMS of the per-edit gradients of each layer
   in --gradient-layers (from the captured factors; no per-edit gradient matrix is formed).
   `--edit-stats` also records, on each N_u's first sample, how the editors route the edits and
   each layer's ‖α·Δ‖_F against ‖W‖_F (`dcedit_kernels.evaluate.edit_statistics`).
4. Writes a Markdown report (the exact command, the machine, timings, the tables, the plots),
   `report.json`, `es_dd_by_n.png` and `gcr_gms_by_layer.png`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dcedit_kernels.cli import (  # noqa: E402
    METHOD_NAMES, UserError, callers_threads_kept, check_out, counted, load_requests, positive_int, rate, refuse_empty,
    require_matplotlib, save_figure, seed_int, set_threads, thread_count, write_json, write_text)
from dcedit_kernels.capture import resolve_modules  # noqa: E402
from dcedit_kernels.editor_cache import cache_dir, random_routing_twin, trained_editor  # noqa: E402
from dcedit_kernels.editors.editor_size import EditorTooLargeError  # noqa: E402
from dcedit_kernels.ft_baseline import locality_texts  # noqa: E402
from dcedit_kernels.reference.grouped_outer import FUSIONS as GROUP_FUSIONS  # noqa: E402

ALL_METHODS = ("ft", "ft_kl", "mend", "raeditor", "moeditor", "proeditor")
TRAINED = ("mend", "moeditor", "proeditor")  # RaEditor = MoEditor's editors, random routing
FUSIONS = tuple(f for f in GROUP_FUSIONS if f != "none")  # the rules an edit can apply
ROUTED = ("raeditor", "moeditor")  # the methods with N_g editors to fuse
LOSS_WEIGHTS = ("balance_weight", "cedit", "cloc")  # TrainConfig fields that --balance-weight etc. override
TABLE_METRICS = (("es", "ES"), ("reliability", "rel"), ("dd", "DD"), ("lmp", "LMP"), ("ns", "NS"),
                 ("latency_s", "latency s"), ("peak_memory_mb", "peak MiB"))


def _default_data(name: str) -> str | None:
    from dcedit_kernels.data import data_path

    path = data_path(name)
    return str(path) if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="evaluation edits (default: counterfact-val.json in "
                   "$DCEDIT_DATA_DIR, else ../shared/data)")
    p.add_argument("--train-data", default=None, help="editor-training edits (default: counterfact-train.json)")
    p.add_argument("--n-train", type=positive_int, default=None,
                   help="training edits to use (default: steps × batch size)")
    p.add_argument("--n-edits", default="25,75,125", help="comma-separated N_u values (default 25,75,125)")
    p.add_argument("--repeats", type=positive_int, default=2, help="edit samples per N_u (default 2)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated methods (default: all of {','.join(ALL_METHODS)})")
    p.add_argument("--layers", default="27,28,29", help="blocks whose mlp.down_proj is edited (default 27,28,29)")
    p.add_argument("--gradient-layers", default="0,5,10,15,20,25,27,28,29",
                   help="blocks whose mlp.down_proj gets GCR/GMS (default 0,5,10,15,20,25,27,28,29)")
    p.add_argument("--rank", type=positive_int, default=32, help="rank of the editors' low-rank MLP (default 32)")
    p.add_argument("--n-editors", type=positive_int, default=2, help="number of editors N_g (raeditor, moeditor; default 2)")
    p.add_argument("--steps", type=positive_int, default=12, help="editor training steps (default 12)")
    p.add_argument("--batch-size", type=positive_int, default=25, help="edits per training step (default 25)")
    p.add_argument("--lr", type=rate, default=1e-3, help="editor learning rate (default 1e-3)")
    p.add_argument("--lr-lr", type=rate, default=1e-4, help="learning rate of the edit steps α (default 1e-4)")
    p.add_argument("--balance-weight", type=rate, default=None,
                   help="weight of MoEditor's gate balance loss in training (default: TrainConfig's, 1e-2)")
    p.add_argument("--cedit", type=rate, default=None,
                   help="weight of the edit loss in training (default: TrainConfig's, MEND's 0.1)")
    p.add_argument("--cloc", type=rate, default=None,
                   help="weight of the KL locality loss in training (default: TrainConfig's, MEND's 1.0)")
    p.add_argument("--length-buckets", default="auto", choices=("auto", "on", "off"),
                   help="train on passes of rows of similar length (TrainConfig.length_buckets; auto: on a CPU "
                        "model, since 0.4.0); off, with --reuse-prefix off, reproduces the editors of versions before "
                        "0.4.0 (one padded pass; the prefix reuse also runs the locality rows in passes of their own)")
    p.add_argument("--reuse-prefix", default="on", choices=("on", "off"),
                   help="the edited pass takes the locality rows' hidden states below the lowest edited block from "
                        "the KL reference pass (TrainConfig.reuse_prefix, since 0.5.0); off reproduces earlier "
                        "versions' editors")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="MoEditor's gate keeps the top k logits (default: the preset's, 2, or 1 with one editor; "
                        "at k = 1 the chosen edit's gate weight is 1, so the gate learns from the balance loss only)")
    p.add_argument("--loss-reduction", default="token", choices=("token", "edit"),
                   help="the editors' edit loss: MEND's batch mean (token) or each edit's own mean, summed (edit); "
                        "default token")
    p.add_argument("--rescale-batch-size", type=positive_int, default=None,
                   help="apply the trained editors with ModelEditor(rescale_batch_size=R): N_u edits with η × N_u/R "
                        "and α × R/N_u (opt-in; R is naturally --batch-size)")
    p.add_argument("--fusions", default="",
                   help="also apply RaEditor and MoEditor with these fusions (comma-separated from "
                        f"{','.join(FUSIONS)}): one more row each, the same trained editors")
    p.add_argument("--edit-stats", action="store_true",
                   help="also record, on each N_u's first sample, how the editors route the edits and the "
                        "size of each layer's shift (`evaluate.edit_statistics`)")
    p.add_argument("--ft-steps", type=positive_int, default=10,
                   help="FT and FT+KL: Adam steps on the edited weights per edit batch (default 10)")
    p.add_argument("--seed", type=seed_int, default=0, help="edit samples' and training seed (default 0)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: 1 on <=2-core machines)")
    p.add_argument("--no-cache", action="store_true", help="retrain the editors even when a cached one exists")
    p.add_argument("--out-dir", default="report_out",
                   help="folder for report.json, report.md and the plots (default ./report_out)")
    p.add_argument("--markdown", default=None, help="Markdown file (default: <out-dir>/report.md)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the editing and training progress bars (not the model loader's)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated ints, got {text!r}") from None
    if not values:
        raise UserError(f"{name} is empty")
    return values


def row_name(key: str) -> str:
    """A results key's table name: "moeditor" → MoEditor, "moeditor:add" → MoEditor (add)."""
    method, _, fusion = key.partition(":")
    return METHOD_NAMES[method] + (f" ({fusion})" if fusion else "")


@contextmanager
def applied_fusion(me, fusion: str | None):
    """`me`'s editors fuse their group shifts by `fusion` inside the block (None: as trained)."""
    saved = {key: editor.fusion for key, editor in me.editors.items()}
    try:
        for editor in me.editors.values():
            editor.fusion = fusion or editor.fusion
        yield
    finally:
        for key, editor in me.editors.items():
            editor.fusion = saved[key]


def held_out(requests: list, training: list) -> tuple[list, int]:
    """The evaluation edits that are not training edits (the same prompt and target), and how many
    were left out."""
    seen = {(r.prompt, r.target) for r in training}
    kept = [r for r in requests if (r.prompt, r.target) not in seen]
    return kept, len(requests) - len(kept)


def kl_source_edits(training: list, evaluated: list, n: int) -> tuple[list, int]:
    """The first `n` training edits whose locality prompt no evaluated edit is scored on (FT+KL
    would fit its KL to a prompt DD then scores: counterfact-val's edit 805 shares one with the
    first 25 of counterfact-train), and how many were skipped before them."""
    scored = {r.locality for r in evaluated if r.locality is not None}
    picked, skipped = [], 0
    for r in training:
        if len(picked) == n:
            break
        if r.locality is not None and r.locality in scored:
            skipped += 1
        else:
            picked.append(r)
    return picked, skipped


def without_scored_locality(training: list, evaluated: list) -> tuple[list, int]:
    """The training edits, those whose locality prompt an evaluated edit is scored on handed over
    without it, and how many: the editors' KL locality loss trains on the training edits' locality
    prompts, and DD would then be scored partly on prompts the editors were fitted to keep (39 of
    counterfact-val's 1919 are locality prompts of the first 300 counterfact-train edits).  An edit
    without one gets another training edit's prompt as its KL row (`train_loss._locality_row`)."""
    from dcedit_kernels.evaluate import without_locality

    scored = {r.locality for r in evaluated if r.locality is not None}
    kept = [without_locality([r])[0] if r.locality in scored else r for r in training]
    return kept, sum(k is not r for k, r in zip(kept, training))


def first_sample_statistics(me, requests: list, sizes: list[int], repeats: int, seed: int) -> dict:
    """{N_u: `edit_statistics` of N_u's first sample}, each routed as the evaluation routed that sample.
    `evaluate_method` runs N_u by N_u, repeat by repeat, and a RaEditor's random groups come from a
    generator that every run draws from: the routing of the runs between two first samples is drawn
    again here (`skip_routing`).  Without it, from the second N_u on, RaEditor's rows described
    another random split of the sample than the one its scores were measured on."""
    from dcedit_kernels.evaluate import edit_statistics, sample_indices

    out = {}
    for n in sizes:
        out[n] = edit_statistics(me, [requests[i] for i in sample_indices(len(requests), n, seed, 0)])
        for _ in range(repeats - 1):
            skip_routing(me, n)
    return out


def skip_routing(me, n_edits: int) -> None:
    """Advance `me`'s routing generators as one apply of `n_edits` edits does, without the apply: it
    runs each edited layer's editor once (`ModelEditor.run_editors`), and each run of a random-routing
    editor draws its groups from the editor's generator (`GroupedEditor.route`, which reads no edit
    features for them); a gate draws nothing outside training.  The other samples' statistics were
    computed whole and dropped (a capture of the model each) only to advance the generators."""
    for name in me.layers:
        editor = me.editors[me.slots[name][0]]
        if editor.routing == "random" and editor.route_generator is not None:
            editor.route(n_edits)


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _nan_if_none(value):
    return float("nan") if value is None else value


def plot_es_dd(results: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=110)
    for ax, (metric, label) in zip(axes, (("es", "ES (edit success)"), ("dd", "DD (drawdown)"), ("lmp", "LMP = ES − DD"))):
        for method, result in results.items():
            # A metric with no score (DD and LMP of samples without locality prompts: None) is a gap, not a crash.
            means = [_nan_if_none(result["by_n"][n][metric]["mean"]) for n in sizes]
            stds = [_nan_if_none(result["by_n"][n][metric]["std"]) for n in sizes]
            ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=row_name(method))
        ax.set_xlabel("N_u (edits applied at once)")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_gradients(grad: dict, sizes: list[int], layers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [int(name.split(".")[2]) for name in layers]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, metric in zip(axes, ("gcr", "gms")):
        for n in sizes:
            ax.plot(blocks, [grad[n][name][metric] for name in layers], marker="o", label=f"N_u={n}")
        ax.set_xlabel("block (mlp.down_proj)")
        ax.set_title({"gcr": "GCR: share of edit pairs with conflicting gradients",
                      "gms": "GMS: gradient magnitude similarity"}[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def gate_top_k(editors: dict) -> int | None:
    """The top_k of the MoEditor among `editors` ({method: ModelEditor}) as it was built, None
    without one (the preset's default when --top-k is not given)."""
    me = editors.get("moeditor")
    return None if me is None else next(iter(me.editors.values())).top_k


def _weight(report: dict, name: str) -> float:
    """A training loss weight of the report: as given on the command line, else TrainConfig's."""
    from dcedit_kernels.train import TrainConfig

    return report["train_config"].get(name, getattr(TrainConfig, name))


def _editors_line(report: dict) -> str:
    """The "Editors ..." line's settings, naming only the editors this report ran."""
    run = {key.split(":")[0] for key in report["methods"]} | set(report["training"])
    tc, ed = report["train_config"], report["editor"]
    parts = [f"rank {ed['rank']}"]
    if run & {"moeditor", "raeditor"}:
        gate = (f"; MoEditor's gate top-{ed.get('top_k', 1)}, balance weight {_weight(report, 'balance_weight')}"
                if "moeditor" in run else "")
        parts.append(f"N_g = {ed['n_editors']} ({', '.join(METHOD_NAMES[m] for m in ROUTED if m in run)}{gate})")
    parts.append(f"loss weights cedit {_weight(report, 'cedit')} and cloc {_weight(report, 'cloc')}")
    if tc.get("length_buckets", False) is not False:  # None: auto, on for the CPU model report.py loads
        parts.append("each batch's rows in passes of similar length (`length_buckets`)")
    if tc.get("reuse_prefix", False):
        parts.append("the locality rows' lower blocks run once, in the KL reference pass (`reuse_prefix`)")
    if "proeditor" in run:
        parts.append("ProEditor with per-token ψ and Fisher keep 0.7 (trained on the masked shift)")
    line = (f"- Editors ({', '.join(METHOD_NAMES[m] for m in report['training']) or 'none'}) trained on the first "
            f"{report['n_train']} edits of `{Path(report['train_data'] or '-').name}`"
            + (f" ({report['n_train_unlocalized']} of them without their locality prompt, which DD scores)"
               if report.get("n_train_unlocalized") else "")
            + f": {counted(tc['steps'], 'step')} × "
            # training caps a batch at the training edits (train_editor warns): say what it ran
            f"{min(tc['batch_size'], report['n_train'] or tc['batch_size'])} edits, Adam lr {tc['lr']} (edit steps α: {tc['lr_lr']}), " + ", ".join(parts) + ". ")
    if "raeditor" in run:
        line += ("RaEditor = MoEditor's editors with random routing, each edit at weight 1 where MoEditor "
                 "scales it by its gate weight (not a scale-matched ablation: RESULTS.md). ")
    if ed.get("rescale_batch_size") is not None:
        size = ed["rescale_batch_size"]
        line += (f"Applied with `rescale_batch_size` {size}: an edit of N_u edits runs the editors on "
                 f"η × N_u/{size} and steps with α × {size}/N_u. ")
    return line + "The editors see the gradients of "


def _train_time(method: str, info: dict) -> str:
    if not info["cached"]:
        return f"{METHOD_NAMES[method]} {info['train_s']:.0f} s"
    earlier = info.get("trained_earlier_s")
    return f"{METHOD_NAMES[method]} loaded from the cache" + (f" (trained in {earlier:.0f} s by an earlier run)" if earlier else "")


def markdown(report: dict, sizes: list[int], grad_layers: list[str], md_path: Path, out_dir: Path) -> str:
    rel = os.path.relpath(out_dir, md_path.parent)
    t = report["timings"]
    grad_sizes = [n for n in sizes if n in report["gradients"]]  # N_u = 1 has no pair of edits
    lines = [
        "# Results: every method at N_u ∈ {" + ", ".join(map(str, sizes)) + "} on SmolLM2-135M (CPU)",
        "",
        f"Generated by `python/report.py` on {report['date']}.",
        "",
        "## What was run",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Model: SmolLM2-135M-Instruct (`{Path(report['model']).name}`), fp32, CPU, "
        f"{counted(report['threads'], 'thread')}; machine: {report['machine']}.",
        f"- Edited weights: {', '.join(f'`{l}`' for l in report['layers'])}.",
        *([_editors_line(report)
           + ("each edit's own mean target NLL, summed (loss_reduction 'edit'): an edit's factors do not depend on "
              "N_u. " if report["editor"].get("loss_reduction") == "edit" else
              "the batch's mean target NLL (loss_reduction 'token', MEND's), which shrink as 1/N_u. ")
           + ("Training time: " + ", ".join(_train_time(m, i) for m, i in report["training"].items()) + "."
              if report["training"] else "")]
          if {key.split(":")[0] for key in report["methods"]} & {*TRAINED, *ROUTED} else []),
        *([f"- Rows \"MoEditor (add)\" and the like: the same trained editors, their group shifts fused by "
           f"that rule at apply time instead of {report['editor'].get('fusion', 'sss')} (`--fusions`)."]
          if any(":" in key for key in report["methods"]) else []),
        *([f"- FT / FT+KL: {counted(report['ft_steps'], 'Adam step')} (lr 5e-4) on the edited weights; FT+KL adds the KL on "
           + (f"the locality prompts of the first {report['ft_kl_edits']} training edits"
              + (f" whose prompts DD does not score ({report['ft_kl_skipped']} skipped)"
                 if report.get("ft_kl_skipped") else "") if report.get("ft_kl_edits")
              else "its generic texts")
           + ". Every method edits without the evaluated edits' locality prompts, which DD is scored on."]
          if {key.split(":")[0] for key in report["methods"]} & {"ft", "ft_kl"} else []),
        f"- Evaluation: `{Path(report['data']).name}` ({report['n_requests']} edits"
        + (f"; {report['n_held_out']} more, training edits too, left out" if report.get("n_held_out") else "")
        + f"); for each N_u, {counted(report['repeats'], 'sample')} of N_u edits (the same samples for every method, seed "
        f"{report['seed']}), each applied as ONE batch, scored, undone. "
        + ("Mean ± std over the samples (the population std, ddof 0: with 2 samples, half their gap)."
           if report["repeats"] > 1 else "One sample: its scores, std 0."),
        "- Metrics: teacher-forced token accuracy of the new target on the rephrase (ES) and on the prompt "
        "(rel); DD = share of locality prompts whose argmax prediction changed; LMP = ES − DD; NS = accuracy of the "
        "locality answer under the edit; latency = wall time of the edit; peak MiB = growth of the process's "
        "resident-set high-water mark during the edit (CPU; see `dcedit_kernels/evaluate.py`).",
        f"- Wall time: load {t['load_s']:.0f} s, training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s, "
        f"gradient statistics {t['gradient_s']:.0f} s; total {t['total_s'] / 60:.1f} min.",
        "",
        "## ES, DD, LMP per method and N_u",
        "",
        "| method | N_u | " + " | ".join(label for _, label in TABLE_METRICS) + " |",
        "|---|---:|" + "---:|" * len(TABLE_METRICS),
    ]
    for n in sizes:
        row = report["unedited"][n]
        cells = [fmt(row[m], 3) for m, _ in TABLE_METRICS]
        lines.append(f"| unedited | {n} | " + " | ".join(cells) + " |")
    for method, result in report["methods"].items():
        for n in sizes:
            row = result["by_n"][n]
            cells = [fmt(row[m], 2 if m in ("latency_s",) else (0 if m == "peak_memory_mb" else 3)) for m, _ in TABLE_METRICS]
            lines.append(f"| {row_name(method)} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![ES, DD and LMP per method and N_u]({rel}/es_dd_by_n.png)",
        "",
        "## Gradient conflict per layer (paper Table 5)",
        "",
        "GCR = share of pairs of edits whose gradients on the layer's weight have negative cosine; GMS = mean "
        "over pairs of 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²). g_i = the gradient of edit i's own mean target NLL "
        "in the unedited model, on the first sample of each N_u.",
        "",
    ]
    if grad_sizes:
        lines += ["| layer | " + " | ".join(f"GCR N_u={n} | GMS N_u={n}" for n in grad_sizes) + " |",
                  "|---|" + "---:|" * (2 * len(grad_sizes))]
    else:  # a table of no column: GCR and GMS are over pairs of edits
        lines.append("None: every N_u is 1, and GCR and GMS are over pairs of edits.")
    for name in grad_layers if grad_sizes else ():
        cells = []
        for n in grad_sizes:
            g = report["gradients"][n][name]
            cells += [f"{g['gcr']:.3f}", f"{g['gms']:.3f}"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", f"![GCR and GMS per layer]({rel}/gcr_gms_by_layer.png)", ""]
    if report.get("edit_statistics"):
        lines += [
            "## Routing and shift size (`--edit-stats`)",
            "",
            "On each N_u's first sample, as `apply` runs the editors (eval mode, no gate noise; nothing "
            "applied): the edits routed to each editor, and ‖α·Δ‖_F of each layer's fused shift against the "
            "weight's own ‖W‖_F.",
            "",
            "| method | N_u | layer | edits per editor | ‖α·Δ‖_F | ‖W‖_F |",
            "|---|---:|---|---|---:|---:|",
        ]
        for method, by_n in report["edit_statistics"].items():
            for n in sizes:
                for name, st in by_n[n].items():
                    lines.append(f"| {row_name(method)} | {n} | `{name}` | "
                                 f"{' / '.join(map(str, st['edits_per_editor']))} | {st['shift_norm']:.3g} | "
                                 f"{st['weight_norm']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    with callers_threads_kept():  # _run sets --threads: called from Python, main() left the process on it
        try:
            return _run(args, t_start)
        except UserError as exc:
            print(f"report: error: {exc}", file=sys.stderr)
            return 2


def _run(args, t_start) -> int:
    from tqdm.auto import tqdm

    from dcedit_kernels.evaluate import (
        evaluate_method, gradient_conflict, sample_indices, summarize, unedited_scores,
    )
    from dcedit_kernels.metrics import lower_blocks_kept
    from dcedit_kernels.model_editor import FT_METHODS, ModelEditor
    from dcedit_kernels.models import default_model_path, load_model

    threads = set_threads(args.threads)
    progress = not args.no_progress
    require_matplotlib()  # the plots come after report.json, before report.md
    refuse_empty(args, {"--data": "a file or a data set's name, or leave it out for counterfact-val",
                        "--train-data": "a file or a data set's name, or leave it out for counterfact-train",
                        "--out-dir": "a folder", "--markdown": "a file name, or leave it out for <out-dir>/report.md"})
    sizes = _ints(args.n_edits, "--n-edits")
    # Checked before the model loads (evaluate_method refuses them only after the editors trained).
    if any(n < 1 for n in sizes):
        raise UserError(f"--n-edits must hold positive ints, got {args.n_edits!r}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--n-edits must not repeat a value, got {args.n_edits!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown:
        raise UserError(f"--fusions: unknown {unknown}; choose from {FUSIONS}")
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {ALL_METHODS}")
    if not methods:  # it once wrote a report of no method, exit status 0
        raise UserError(f"--methods is empty; choose from {ALL_METHODS}")
    if fusions and not set(methods) & set(ROUTED):  # its rows are RaEditor's and MoEditor's: ignored otherwise
        raise UserError(f"--fusions adds rows to {ROUTED} only, and --methods holds neither")
    if set(methods) & set(ROUTED):  # the MoEditor (only it takes --top-k; RaEditor is its twin) is built after the model loads
        if args.top_k is not None and args.top_k > args.n_editors:
            raise UserError(f"--top-k {args.top_k} cannot exceed --n-editors {args.n_editors}")
    if args.rescale_batch_size is not None and args.loss_reduction != "token":
        raise UserError("--rescale-batch-size undoes the 1/N_u scale of --loss-reduction token, not edit")
    data = args.data or _default_data("counterfact-val")
    train_data = args.train_data or _default_data("counterfact-train")
    if data is None:  # name the folder looked in: $DCEDIT_DATA_DIR when set, not always ../shared/data
        from dcedit_kernels.data import data_path

        raise UserError(f"--data is required (no {data_path('counterfact-val')})")
    requests = load_requests(data)
    n_train = args.n_train or args.steps * args.batch_size
    needs_training = any(m in TRAINED or m == "raeditor" for m in methods)
    if needs_training and train_data is None:
        raise UserError("--train-data is required to train the editors")
    train_requests = load_requests(train_data, n_train, flag="--train-data") if needs_training else []
    # Evaluation edits that are training edits (--data and --train-data may be one file, as zsRE's
    # only file is) are left out; with the usual CounterFact split there are none.
    requests, n_overlap = held_out(requests, train_requests)
    if n_overlap:
        print(f"note: {n_overlap} of the {len(requests) + n_overlap} evaluation edits are training edits: "
              f"evaluating on the other {len(requests)}", flush=True)
    if max(sizes) > len(requests):
        raise UserError(f"--n-edits asks for {max(sizes)} edits but {data} holds {len(requests)}"
                        + (f" besides the {n_overlap} training edits" if n_overlap else ""))
    # FT+KL's KL texts: the locality prompts of --batch-size training edits (as many as an editor's
    # training batch holds), the first whose prompt no evaluation edit is scored on; the evaluation's
    # own, which DD is scored on, are held out from every method (`evaluate.without_locality`).
    # Without --train-data, its generic texts.
    kl_edits, kl_skipped = [], 0
    if "ft_kl" in methods and train_data is not None:
        kl_edits, kl_skipped = kl_source_edits(train_requests or load_requests(train_data, flag="--train-data"), requests,
                                                 args.batch_size)
    kl_texts = locality_texts(kl_edits)
    train_requests, n_train_unlocalized = without_scored_locality(train_requests, requests)
    layers = [f"model.layers.{i}.mlp.down_proj" for i in _ints(args.layers, "--layers")]
    grad_layers = [f"model.layers.{i}.mlp.down_proj" for i in _ints(args.gradient_layers, "--gradient-layers")]
    train_config = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_lr=args.lr_lr, seed=args.seed)
    for name in LOSS_WEIGHTS:  # only when given: the editors cached without them keep their keys
        if getattr(args, name) is not None:
            train_config[name] = getattr(args, name)
    if needs_training:  # a bad --lr, --cloc, ... is refused before the model loads, not after
        from dcedit_kernels.train import TrainConfig

        try:
            TrainConfig(**train_config)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    out_dir = Path(args.out_dir)
    md_path = Path(args.markdown) if args.markdown else out_dir / "report.md"
    # Before the model loads: a file in the way is one error line, not a traceback (report.md is written
    # only at the end, after the whole run: a folder there was a traceback, no report.md).  The folders are
    # made when the files are written (write_json, below): made here, a run refused after the load
    # (--layers the model lacks) left them behind, empty.
    # The plots too: a folder at es_dd_by_n.png was a traceback after the whole run, with a new report.json
    # beside the previous run's report.md.
    outputs = [("--out-dir", out_dir / name, True) for name in ("report.json", "es_dd_by_n.png", "gcr_gms_by_layer.png")]
    for flag, path, in_folder in outputs + [("--markdown", md_path, False)]:
        check_out(str(path), flag, in_folder)  # in_folder: --out-dir names the folder, not the file

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model_file = str(default_model_path())
    model, tokenizer = load_model()  # the capture freezes the parameters for its own pass
    load_s = time.perf_counter() - t0
    # Every block named exists, checked before any training or evaluation (--gradient-layers is
    # only used at the end of the run).
    for flag, names in (("--layers", layers), ("--gradient-layers", grad_layers)):
        try:
            resolve_modules(model, names, arg=flag)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    # Recorded always, "auto" as what it does on the model's device (one cached editor for "auto"
    # and "on" on a CPU model): a report without it trained in one pass.
    train_config["length_buckets"] = {"auto": model.device.type == "cpu", "on": True, "off": False}[args.length_buckets]
    # Recorded always: a report without it ran every block for every row.
    train_config["reuse_prefix"] = args.reuse_prefix == "on"
    train_ids = [f"{r.prompt}\t{r.target}" for r in train_requests]

    def kwargs_of(method):
        kwargs = dict(rank=args.rank, seed=args.seed, loss_reduction=args.loss_reduction)
        if method in ("raeditor", "moeditor"):
            kwargs["n_editors"] = args.n_editors
        if method == "moeditor" and args.top_k is not None:  # only when given: cached editors keep their keys
            kwargs["top_k"] = args.top_k
        if args.rescale_batch_size is not None:  # a runtime setting: not in the cache key
            kwargs["rescale_batch_size"] = args.rescale_batch_size
        return kwargs

    editors, training = {}, {}
    to_train = [m for m in TRAINED if m in methods or (m == "moeditor" and "raeditor" in methods)]
    for method in to_train:
        try:
            editors[method], training[method] = trained_editor(
                model, tokenizer, method, layers, kwargs_of(method), train_config, train_requests, train_ids,
                model_file, use_cache=not args.no_cache, progress=progress)
        except EditorTooLargeError as exc:  # --n-editors 10**11: one error line, not a traceback
            raise UserError(str(exc)) from None
        print(f"{METHOD_NAMES[method]}: " + ("loaded from cache" if training[method]["cached"]
                                             else f"trained in {training[method]['train_s']:.0f} s"), flush=True)
    if "raeditor" in methods:
        editors["raeditor"] = random_routing_twin(editors["moeditor"], **kwargs_of("raeditor"))
    for method in ("ft", "ft_kl"):
        if method in methods:
            kl = {"locality_texts": kl_texts} if method == "ft_kl" and kl_texts else {}
            editors[method] = ModelEditor(model, tokenizer, layers=layers, method=method, ft_steps=args.ft_steps, **kl)
    train_s = sum(i["train_s"] for i in training.values())
    # RaEditor's groups come from its routing generator, which keeps drawing: each row starts it
    # from the same state, so a --fusions row routes the edits as the method's own row did.
    routing = {m: editors[m].route_states() for m in ROUTED if m in editors}
    routed = [editors[m] for m in ROUTED if m in editors]
    trained_fusion = next(iter(routed[0].editors.values())).fusion if routed else None

    t0 = time.perf_counter()
    results, base_cache = {}, {}  # the unedited model's locality predictions, shared by all methods
    # Every method (and fusion row) edits the same layers and is scored on the same samples in the same
    # batches: the blocks below the edited ones run once per scoring batch, in the first method's
    # runs, and every later scoring pass runs from their kept output (`measure_edit(lower_blocks=)`;
    # the same scores), the unedited row's too.  It keeps rows × width × hidden values per batch.
    # SmolLM2, MEND then MoEditor (untrained, layers 27-29) on the same 25 CounterFact edits and the
    # unedited row, 1 thread, 3 alternating pairs on a 2-core machine shared with ~7 processes:
    # 10.4 s of CPU time instead of 17.1 (medians; 9.9-10.4 against 17.0-20.1), the same results.
    lower_blocks = {}
    runs = [(m, None) for m in methods] + [(m, f) for m in methods if m in ROUTED for f in fusions]
    for method, fusion in runs:
        key = method if fusion is None else f"{method}:{fusion}"
        editors[method].set_route_states(routing.get(method, {}))
        with applied_fusion(editors[method], fusion):
            results[key] = evaluate_method(model, tokenizer, editors[method], requests, n_edits=sizes,
                                           repeats=args.repeats, seed=args.seed, progress=progress,
                                           base_cache=base_cache, lower_blocks=lower_blocks)
        for n in sizes:
            row = results[key]["by_n"][n]
            print(f"{row_name(key):<16} N_u={n:<4} ES {fmt(row['es'])}  DD {fmt(row['dd'])}  "
                  f"LMP {fmt(row['lmp'])}", flush=True)

    # The unedited model on the same samples: what ES/rel/NS are before any edit.
    unedited = {}
    for n in sizes:
        with lower_blocks_kept(editors[methods[0]].modules, lower_blocks):
            runs = [unedited_scores(model, tokenizer,
                                    [requests[i] for i in sample_indices(len(requests), n, args.seed, r)])
                    for r in range(args.repeats)]
        unedited[n] = {m: summarize([run[m] for run in runs]) for m in ("es", "reliability", "dd", "lmp", "ns")}
        unedited[n].update(latency_s=summarize([None]), peak_memory_mb=summarize([None]))
    eval_s = time.perf_counter() - t0

    stats = {}  # {method: {N_u: {layer: edit_statistics}}}
    if args.edit_stats:
        for method in (m for m in methods if m not in FT_METHODS):
            editors[method].set_route_states(routing.get(method, {}))
            stats[method] = first_sample_statistics(editors[method], requests, sizes, args.repeats, args.seed)

    t0 = time.perf_counter()
    gradients = {}
    grad_sizes = [n for n in sizes if n >= 2]  # GCR and GMS are over pairs of edits: none at N_u = 1
    for n in tqdm(grad_sizes, desc="GCR/GMS", disable=not progress):
        sample = [requests[i] for i in sample_indices(len(requests), n, args.seed, 0)]
        gradients[n] = gradient_conflict(model, tokenizer, grad_layers, sample)
    gradient_s = time.perf_counter() - t0

    report = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + args.argv),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        model=model_file, threads=threads, layers=layers, data=data, train_data=train_data,
        n_requests=len(requests), n_held_out=n_overlap, n_train=len(train_requests), repeats=args.repeats,
        n_train_unlocalized=n_train_unlocalized,
        seed=args.seed,
        train_config=train_config, editor=dict(rank=args.rank, n_editors=args.n_editors, top_k=gate_top_k(editors), loss_reduction=args.loss_reduction,
                                              fusion=trained_fusion, rescale_batch_size=args.rescale_batch_size),
        ft_steps=args.ft_steps,
        ft_kl_edits=len(kl_edits) if kl_texts else 0, ft_kl_skipped=kl_skipped,
        training=training, methods=results, unedited=unedited, gradients=gradients,
        edit_statistics=stats,
        cache_dir=str(cache_dir()),
        timings=dict(load_s=load_s, train_s=train_s, eval_s=eval_s, gradient_s=gradient_s,
                     total_s=time.perf_counter() - t_start),
    )
    # The plots first, then the JSON and the markdown one after the other: a failure in a plot left a new
    # report.json beside the previous run's report.md.
    out_dir.mkdir(parents=True, exist_ok=True)  # made now, at the end (check_out above made none)
    plot_es_dd(results, sizes, out_dir / "es_dd_by_n.png")
    plot_gradients(gradients, grad_sizes, grad_layers, out_dir / "gcr_gms_by_layer.png")
    write_json(out_dir / "report.json", report)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(md_path, markdown(report, sizes, grad_layers, md_path, out_dir))
    print(f"wrote {md_path}, {out_dir / 'report.json'} and the plots in {out_dir}; "
          f"total {report['timings']['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
