"""Command line: train locally with no service, or sample from a checkpoint.

    python -m worker.engine train SPEC.json --data FILE --out DIR [--device cpu] [--resume CKPT]
    python -m worker.engine sample CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
    python -m worker.engine export CHECKPOINT --format hf|safetensors --out PATH

CHECKPOINT is a checkpoint (.pt) or a weights-only file (.safetensors). `export` runs the exporter
of the stabletrain_export package (safetensors, tokenizers), imported only by that command so the
engine itself stays torch + stdlib.

Exit codes: 0 training finished, 1 training failed (or was stopped), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from .checkpoint import CheckpointError
from .config import SpecError, parse_spec
from .data import DataError
from .diagnosis import health_of
from .trainer import Callbacks


class FileCallbacks(Callbacks):
    """Writes metrics.jsonl, layers.jsonl, activations.jsonl and events.jsonl into the output folder."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, TextIO] = {
            name: open(out_dir / f"{name}.jsonl", "a", encoding="utf-8") for name in ("metrics", "layers", "activations", "events")
        }
        self.stop_requested = False

    def _write(self, name: str, rows: list[dict[str, Any]]) -> None:
        fh = self.files[name]
        for row in rows:
            fh.write(json.dumps(_json_safe(row)) + "\n")
        fh.flush()

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        self._write("metrics", rows)

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._write("layers", [{"step": step, **r} for r in rows])

    def on_activation_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._write("activations", [{"step": step, **r} for r in rows])

    def on_event(self, event: dict[str, Any]) -> None:
        self._write("events", [event])
        if event["kind"] in ("nonfinite", "rollback", "checkpoint_failed", "failed"):
            print(f"  step {event['step']}: {event['message']}", file=sys.stderr)

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        pass

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        pass

    def on_diagnosis(self, findings: list[dict[str, Any]], summary: str) -> None:
        pass

    def may_write_checkpoints(self) -> bool:
        return True

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fail_input(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    """Train one spec on one text file; write records and checkpoints into --out."""
    try:
        raw = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        spec = parse_spec(raw)
        text = Path(args.data).read_text(encoding="utf-8")
    except SpecError as exc:
        return _fail_input(f"invalid spec: {exc}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _fail_input(str(exc).splitlines()[0])
    from .distributed import RankFailed, run_data_parallel  # torch import only once input is known to be good
    from .trainer import Trainer

    out = Path(args.out)
    callbacks = FileCallbacks(out)
    signal.signal(signal.SIGINT, lambda *_: setattr(callbacks, "stop_requested", True))
    resume_from = Path(args.resume) if args.resume else None
    try:
        if spec.resources.devices > 1:  # data parallel: ranks spawned here, this process reports
            result = run_data_parallel(spec, text, out / "checkpoints", callbacks,
                                       device_type=args.device.split(":", 1)[0], resume_from=resume_from)
        else:
            result = Trainer(spec, text, out / "checkpoints", callbacks, device=args.device,
                             resume_from=resume_from).run()
    except (DataError, CheckpointError, ValueError) as exc:
        callbacks.close()
        return _fail_input(str(exc))
    except RankFailed as exc:
        callbacks.close()
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    callbacks.close()
    (out / "diagnosis.json").write_text(json.dumps(_json_safe({
        "status": result.status, "step": result.step, "error": result.error,
        "health": health_of(result.diagnosis), "summary": result.summary, "findings": result.diagnosis,
    }), indent=2))
    _print_summary(result, out)
    return 0 if result.status == "succeeded" else 1


def _print_summary(result: Any, out: Path) -> None:
    print(f"{result.status} after {result.step} steps")
    if result.error:
        print(f"error: {result.error}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint['path']} (val_loss {result.checkpoint['val_loss']})")
    print(f"health: {health_of(result.diagnosis)}")
    print(result.summary)
    print(f"records: {out}/metrics.jsonl, layers.jsonl, events.jsonl, diagnosis.json")


def cmd_sample(args: argparse.Namespace) -> int:
    """Print text generated from a checkpoint."""
    from .sampling import sample_from_checkpoint

    try:
        text = sample_from_checkpoint(Path(args.checkpoint), args.prompt, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                      device=args.device)
    except (OSError, CheckpointError, SpecError, ValueError, KeyError, RuntimeError) as exc:
        return _fail_input(f"cannot sample from {args.checkpoint}: {str(exc).splitlines()[0]}")
    print(text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a Hugging Face folder (hf) or a weights-only file (safetensors) of a checkpoint."""
    from stabletrain_export import export_file
    from stabletrain_export.weights import ExportError

    try:
        out = export_file(Path(args.checkpoint), args.format, Path(args.out))
    except (OSError, CheckpointError, ExportError) as exc:
        return _fail_input(f"cannot export {args.checkpoint}: {str(exc).splitlines()[0]}")
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker.engine", description="StableTrain engine")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a spec locally")
    train.add_argument("spec", help="job spec JSON file")
    train.add_argument("--data", required=True, help="UTF-8 text corpus")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--device", default="cpu")
    train.add_argument("--resume", help="checkpoint to resume from")
    train.set_defaults(func=cmd_train)
    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("checkpoint")
    sample.add_argument("--prompt", default="")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(func=cmd_sample)
    export = sub.add_parser("export", help="export a checkpoint for Hugging Face or as weights only")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=("hf", "safetensors"), default="hf")
    export.add_argument("--out", required=True, help="folder (hf) or .safetensors file")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
