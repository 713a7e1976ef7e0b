"""`rlhf-kernels label`: a terminal tool that turns a person's side-by-side choices
into reward-model and DPO data, and `label --stats` to look at what was collected.

For each prompt two responses are shown (sampled from --model with two seeds, or
read from --pairs), in a random order that is recorded. Keys (seed 004's scale):

    1  Response 1 is better          2  Response 1 is only slightly better
    3  Response 2 is only slightly better          4  Response 2 is better
    t  tie     s  skip     u  undo last     g  guidelines     q  quit

Every answer is appended to --out at once (flushed and fsynced), so nothing is lost
if the program is killed; running it again resumes after the prompts this labeler
already answered (or skipped). A record is the trainer's preference format plus:

    {"prompt", "chosen", "rejected", "strength": "better" | "slightly better" | "tie",
     "tie": bool, "margin": 1.0 | 0.5 | 0.0, "labeler", "timestamp",
     "prompt_index", "shown_first": "a" | "b", "preferred_position": 1 | 2 | null,
     "response_a", "response_b"}

and a skip is {"prompt", "prompt_index", "skipped": true, "labeler", "timestamp"}.
`rlhf-kernels train rm|dpo --data` reads these files directly: skips and ties are
left out, and the reward model uses "margin" as the Bradley-Terry margin.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass

from .data import DataError

RATINGS = {
    "1": (1, "better"),
    "2": (1, "slightly better"),
    "3": (2, "slightly better"),
    "4": (2, "better"),
}
MARGINS = {"better": 1.0, "slightly better": 0.5, "tie": 0.0}
DEFAULT_GUIDELINES = """Guidelines
- Prefer the response that is more helpful, correct and honest for this prompt.
- Judge the content, not the position: the order on screen is random.
- Use "slightly better" when the difference is small; use tie only when neither is better.
- Skip prompts you cannot judge."""
KEYS_LINE = "[1] R1 better  [2] R1 slightly  [3] R2 slightly  [4] R2 better  [t]ie [s]kip [u]ndo [g]uidelines [q]uit"


@dataclass
class Pair:
    index: int
    prompt: str
    a: str
    b: str


def fail(message: str) -> None:
    """A one-line error and exit status 2."""
    print(f"rlhf-kernels label: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _read_lines(path: str, fields: tuple[str, ...]) -> list[dict]:
    try:
        with open(path) as source:
            lines = source.readlines()
    except OSError as error:
        fail(f"{path}: cannot read ({error.strerror})")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"{path}:{number}: not valid JSON ({error.msg})")
        if not isinstance(record, dict):
            fail(f"{path}:{number}: expected a JSON object")
        for field in fields:
            if not isinstance(record.get(field), str):
                fail(f"{path}:{number}: missing string field {field!r}")
        records.append(record)
    if not records:
        fail(f"{path}: no records")
    return records


def pairs_from_file(path: str) -> list[Pair]:
    """--pairs: {"prompt", "response_a", "response_b"} per line."""
    rows = _read_lines(path, ("prompt", "response_a", "response_b"))
    return [Pair(i, r["prompt"], r["response_a"], r["response_b"]) for i, r in enumerate(rows)]


def pairs_from_model(prompts_path: str, model_path: str, *, temperature: float, max_new_tokens: int,
                     seed: int) -> list[Pair]:  # fmt: skip
    """--model: two responses per prompt, sampled with two different seeds."""
    import torch

    from .models import load_causal_lm
    from .sampling import decode_responses, sample_responses

    prompts = [r["prompt"] for r in _read_lines(prompts_path, ("prompt",))]
    try:
        model, tokenizer = load_causal_lm(model_path)
    except (OSError, ValueError) as error:
        fail(f"--model {model_path}: cannot load ({str(error).splitlines()[0]})")
    model.eval()
    pairs = []
    for index, prompt in enumerate(prompts):
        responses = []
        for k in range(2):
            generator = torch.Generator().manual_seed(seed + 2 * index + k)
            batch = sample_responses(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                     temperature=temperature, generator=generator)  # fmt: skip
            responses.append(decode_responses(tokenizer, batch)[0])
        pairs.append(Pair(index, prompt, *responses))
    return pairs


def labeled_indices(out_path: str, labeler: str) -> set[int]:
    if not os.path.exists(out_path):
        return set()
    done = set()
    with open(out_path) as source:
        for line in source:
            if line.strip():
                record = json.loads(line)
                if record.get("labeler") == labeler:
                    done.add(record["prompt_index"])
    return done


def append(out_path: str, record: dict) -> None:
    with open(out_path, "a") as out:
        out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())


def remove_last(out_path: str, labeler: str) -> dict | None:
    """Drops this labeler's last record (undo); returns it."""
    if not os.path.exists(out_path):
        return None
    with open(out_path) as source:
        lines = [line for line in source if line.strip()]
    for position in range(len(lines) - 1, -1, -1):
        record = json.loads(lines[position])
        if record.get("labeler") == labeler:
            del lines[position]
            temporary = out_path + ".tmp"
            with open(temporary, "w") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, out_path)
            return record
    return None


def render(pair: Pair, first: str, second: str, done: int, total: int, labeled: int, width: int) -> str:
    """The screen: progress line, prompt, and the two responses side by side (stacked
    when the terminal is narrower than 100 columns)."""
    rule = "-" * min(width, 120)
    lines = [f"prompt {done + 1} of {total}  (labeled so far: {labeled})", rule, "Prompt:"]
    lines += textwrap.wrap(pair.prompt, width=min(width, 120)) or [""]
    lines.append(rule)
    if width >= 100:
        column = (min(width, 120) - 3) // 2
        left = ["Response 1", *(textwrap.wrap(first, column) or ["(empty)"])]
        right = ["Response 2", *(textwrap.wrap(second, column) or ["(empty)"])]
        for row in range(max(len(left), len(right))):
            a = left[row] if row < len(left) else ""
            b = right[row] if row < len(right) else ""
            lines.append(f"{a:<{column}} | {b}")
    else:
        lines += ["Response 1:", *(textwrap.wrap(first, width) or ["(empty)"]), ""]
        lines += ["Response 2:", *(textwrap.wrap(second, width) or ["(empty)"])]
    lines += [rule, KEYS_LINE]
    return "\n".join(lines)


class KeyReader:
    """One key at a time from a terminal (cbreak mode), or one line at a time otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.terminal = stream.isatty()
        self.saved = None

    def __enter__(self):
        if self.terminal:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)

    def read(self) -> str:
        if self.terminal:
            return os.read(self.stream.fileno(), 1).decode(errors="ignore")
        line = self.stream.readline()
        return line.strip()[:1] if line else "q"


def label(pairs: list[Pair], out_path: str, labeler: str, guidelines: str, *, seed: int = 0,
          stdin=None, stdout=None) -> int:  # fmt: skip
    """The interactive loop; returns how many answers this session wrote."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    done = labeled_indices(out_path, labeler)
    history: list[int] = []  # prompt indices answered this session, for undo
    written = 0

    def show(text: str) -> None:
        stdout.write("\n" + text + "\n")
        stdout.flush()

    queue = [pair for pair in pairs if pair.index not in done]
    if not queue:
        show(f"All {len(pairs)} prompts are already labeled by {labeler} in {out_path}.")
        return 0
    with KeyReader(stdin) as keys:
        position = 0
        while position < len(queue):
            pair = queue[position]
            order = random.Random(f"{seed}:{labeler}:{pair.index}").random() < 0.5
            shown_first = "a" if order else "b"
            first, second = (pair.a, pair.b) if order else (pair.b, pair.a)
            width = shutil.get_terminal_size((100, 30)).columns
            show(render(pair, first, second, len(pairs) - len(queue) + position, len(pairs), len(done) + written,
                        width))  # fmt: skip
            key = keys.read().lower()
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if key == "q":
                show(f"Saved {written} answers to {out_path}. Run the same command to resume.")
                return written
            if key == "g":
                show(guidelines)
                continue
            if key == "u":
                if not history:
                    show("Nothing to undo in this session.")
                    continue
                removed = remove_last(out_path, labeler)
                history.pop()
                written -= 1
                position -= 1
                show(f"Undid the answer to prompt {removed['prompt_index'] + 1}.")
                continue
            base = {"prompt": pair.prompt, "prompt_index": pair.index, "labeler": labeler, "timestamp": now}
            if key == "s":
                record = {**base, "skipped": True}
            elif key == "t":
                record = {**base, "chosen": pair.a, "rejected": pair.b, "strength": "tie", "tie": True,
                          "margin": 0.0, "shown_first": shown_first, "preferred_position": None}  # fmt: skip
            elif key in RATINGS:
                preferred_position, strength = RATINGS[key]
                preferred = first if preferred_position == 1 else second
                other = second if preferred_position == 1 else first
                record = {**base, "chosen": preferred, "rejected": other, "strength": strength, "tie": False,
                          "margin": MARGINS[strength], "shown_first": shown_first,
                          "preferred_position": preferred_position}  # fmt: skip
            else:
                show(f"Unknown key {key!r}. {KEYS_LINE}")
                continue
            if not record.get("skipped"):
                record.update(response_a=pair.a, response_b=pair.b)
            append(out_path, record)
            history.append(pair.index)
            written += 1
            position += 1
    show(f"Done: {written} answers this session, saved to {out_path}.")
    return written


def stats(paths: list[str]) -> str:
    """Counts, tie rate, position bias and agreement between labelers on shared prompts."""
    records = []
    for path in paths:
        for record in _read_lines(path, ("prompt",)):
            records.append(record)
    answered = [r for r in records if not r.get("skipped")]
    ties = [r for r in answered if r.get("tie")]
    decided = [r for r in answered if not r.get("tie")]
    first_preferred = sum(1 for r in decided if r.get("preferred_position") == 1)
    labelers = sorted({r.get("labeler", "?") for r in records})
    lines = [
        f"files: {len(paths)}  labelers: {', '.join(labelers)}",
        f"records: {len(records)}  answered: {len(answered)}  skipped: {len(records) - len(answered)}",
        f"tie rate: {len(ties) / max(len(answered), 1):.1%}",
        f"position bias: the response shown first was preferred in {first_preferred / max(len(decided), 1):.1%} "
        f"of {len(decided)} decided comparisons (50% = no bias)",
    ]
    by_prompt: dict[str, dict[str, str]] = defaultdict(dict)
    for r in answered:
        by_prompt[r["prompt"]][r.get("labeler", "?")] = "tie" if r.get("tie") else r["chosen"]
    agree = total = 0
    for choices in by_prompt.values():
        names = sorted(choices)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                total += 1
                agree += choices[names[i]] == choices[names[j]]
    if total:
        lines.append(f"agreement between labelers: {agree / total:.1%} of {total} shared judgements")
    else:
        lines.append("agreement between labelers: no prompt was labeled by two labelers")
    return "\n".join(lines)


def add_label_parser(commands) -> None:
    parser = commands.add_parser("label", help="label pairs of responses side by side into preference data")
    parser.add_argument("--prompts", help="JSONL of {'prompt'} (with --model)")
    parser.add_argument("--out", help="the preference JSONL to append to (resumed if it exists)")
    parser.add_argument("--model", help="a local Hugging Face causal LM to sample two responses from")
    parser.add_argument("--pairs", help="JSONL of {'prompt', 'response_a', 'response_b'}")
    parser.add_argument("--guidelines", help="a text file shown on 'g'")
    parser.add_argument("--labeler", default=os.environ.get("USER", "labeler"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", nargs="+", metavar="PREFS.jsonl", help="print statistics of labeled files")


def run_label(args) -> int:
    if args.stats:
        print(stats(args.stats))
        return 0
    if not args.out:
        fail("--out PREFS.jsonl is required")
    if bool(args.model) == bool(args.pairs):
        fail("give exactly one of --model (with --prompts) or --pairs")
    guidelines = DEFAULT_GUIDELINES
    if args.guidelines:
        try:
            with open(args.guidelines) as source:
                guidelines = source.read()
        except OSError as error:
            fail(f"--guidelines {args.guidelines}: cannot read ({error.strerror})")
    if args.pairs:
        pairs = pairs_from_file(args.pairs)
    else:
        if not args.prompts:
            fail("--model needs --prompts PROMPTS.jsonl")
        pairs = pairs_from_model(args.prompts, args.model, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    try:
        label(pairs, args.out, args.labeler, guidelines, seed=args.seed)
    except DataError as error:
        fail(str(error))
    return 0
