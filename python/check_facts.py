"""Check which of our default facts SmolLM2 knows before editing, and record them.

    python python/check_facts.py            # print the verdict per fact and the counts
    python python/check_facts.py --write    # also rewrite the GENERATED block of dcedit_kernels/facts.py
    python python/check_facts.py --model X  # the verdicts of another model (printed only: --write is SmolLM2's)

A fact is kept when the unedited model (fp32, CPU) (1) greedy-decodes a continuation of its prompt
that starts with the true target followed by neither a letter nor a digit (so "Paris." counts,
"Parisian" does not, nor "90" for the answer "9") and (2) predicts every token of the true target under teacher forcing (the token-level
argmax criterion the metrics use).  Neighbour prompts are checked the same way; only those that
pass are dealt out to the facts.  Takes a few minutes on CPU (356 prompts + 59 neighbours).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dcedit_kernels import facts as facts_module  # noqa: E402
from dcedit_kernels.devices import input_device  # noqa: E402
from dcedit_kernels.models import default_model_path, load_model  # noqa: E402
from dcedit_kernels.metrics import target_accuracy  # noqa: E402


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches, so every row ends at its prompt)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Built on the CPU whatever torch.set_default_device says ("meta": the tokenizer's tensors had no
        # data, and generate raised), then moved to where the model reads its input.
        with torch.device("cpu"):
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        enc = enc.to(input_device(model))
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        # no space clean-up, as greedy_completions: the same text (and no warning) on every transformers
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    return out


def starts_with_answer(continuation: str, answer: str) -> bool:
    text = continuation.lstrip()
    # Not a letter (a longer word) nor a digit: " 90" is no greedy "9" (the neighbour "The square
    # root of 81 is" would have passed with it).
    return text.startswith(answer) and not re.match(r"[^\W_]", text[len(answer) : len(answer) + 1])


def check(model, tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[bool], list[str]]:
    n_new = max(len(tokenizer(" " + a)["input_ids"]) for a in answers) + 1
    greedy = greedy_continuations(model, tokenizer, prompts, n_new)
    # every target token right under teacher forcing, the LM head computing the scored positions only
    forced = (target_accuracy(model, tokenizer, prompts, answers, batch_size=32, exact=True) == 1).tolist()
    return [starts_with_answer(g, a) and f for g, a, f in zip(greedy, answers, forced)], greedy


def write_generated_block(known_facts: list[str], known_neighbours: list[str]) -> None:
    path = REPO / "dcedit_kernels" / "facts.py"
    text = path.read_text()
    begin = text.index("# BEGIN GENERATED")
    end = text.index("# END GENERATED")
    header = text[begin : text.index("\n", begin) + 1]

    def tuple_literal(name, items):
        body = "".join(f"    {item!r},\n" for item in items)
        return f"{name}: tuple[str, ...] = (\n{body})\n"

    block = header + tuple_literal("SMOLLM2_KNOWN_FACTS", known_facts) + tuple_literal("SMOLLM2_KNOWN_NEIGHBOURS", known_neighbours)
    path.write_text(text[:begin] + block + text[end:])


def is_default_model(name_or_path: str | None) -> bool:
    """Whether --model names the embedded SmolLM2 (None, or the path of its gguf file)."""
    if name_or_path is None:
        return True
    try:
        return Path(name_or_path).resolve() == default_model_path().resolve()
    except (OSError, ValueError):  # SmolLM2 not installed (FileNotFoundError), a path the OS refuses
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the GENERATED block of dcedit_kernels/facts.py "
                        "(the embedded SmolLM2's facts: not with another --model)")
    parser.add_argument("--model", default=None, help="model to check (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)
    if args.write and not is_default_model(args.model):
        # The block is SMOLLM2_KNOWN_FACTS/NEIGHBOURS, what the demo edits SmolLM2 with: another
        # model's verdicts replaced them (a tiny random Llama's wrote both empty).  Before the load.
        print(f"check_facts: error: --write records the embedded SmolLM2's facts (SMOLLM2_KNOWN_FACTS in "
              f"dcedit_kernels/facts.py), not --model {args.model}'s; run without --write to see its verdicts",
              file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model, tokenizer = load_model(args.model)
    except (OSError, ValueError) as exc:  # FileNotFoundError included: a bad --model, one line, not a traceback
        print(f"check_facts: error: --model: {exc}", file=sys.stderr)
        return 2
    neighbours = facts_module.CANDIDATE_NEIGHBOURS
    n_ok, n_greedy = check(model, tokenizer, [p for p, _ in neighbours], [a for _, a in neighbours])
    known_neighbours = [p for (p, _), ok in zip(neighbours, n_ok) if ok]
    for (p, a), ok, g in zip(neighbours, n_ok, n_greedy):
        print(f"{'KEEP' if ok else 'drop'} neighbour {p!r} -> {a!r} (greedy: {g!r})")

    candidates = facts_module.candidate_facts()
    f_ok, f_greedy = check(model, tokenizer, [f.prompt for f in candidates], [f.true_target for f in candidates])
    known_facts = [f.id for f, ok in zip(candidates, f_ok) if ok]
    for f, ok, g in zip(candidates, f_ok, f_greedy):
        print(f"{'KEEP' if ok else 'drop'} {f.id}: {f.prompt!r} -> {f.true_target!r} (greedy: {g!r})")

    by_relation = {}
    for f, ok in zip(candidates, f_ok):
        kept, total = by_relation.get(f.relation, (0, 0))
        by_relation[f.relation] = (kept + ok, total + 1)
    print()
    for relation, (kept, total) in by_relation.items():
        print(f"{relation:14s} {kept:3d} / {total:3d}")
    print(f"facts kept: {len(known_facts)} / {len(candidates)}; neighbours kept: {len(known_neighbours)} / {len(neighbours)}")
    print(f"took {time.perf_counter() - t0:.0f} s")
    if args.write:
        write_generated_block(known_facts, known_neighbours)
        print("wrote the GENERATED block of dcedit_kernels/facts.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
