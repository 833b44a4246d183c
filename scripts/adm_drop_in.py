"""fastguide's one-line changes inside ADM's own sampling scripts, measured on an ADM checkout.

Imports ``guided_diffusion`` from the checkout named by ``--adm`` (openai/guided-diffusion, or a fork such
as the EDS paper's release), builds small networks from ADM's own flags with its ``script_util``, and runs
the loops of its three sampling scripts as they are and with fastguide's line:

* ``scripts/classifier_sample.py``: ADM's cond_fn; ``cond_fn = fastguide.adm.eds_cond_fn(classifier,
  args.classifier_scale, diffusion)`` (EDS in ADM's loop); ``diffusion = fastguide.adm.accelerate(diffusion)``
  (ADM's cond_fn, fastguide's loop); both; and accelerate with ``SamplerConfig(compile=True)``.
* ``scripts/image_sample.py``: ``diffusion = fastguide.adm.accelerate(diffusion)``.
* ``scripts/super_res_sample.py``: the same line, with its ``low_res`` model_kwargs.

Contenders of one script run side by side, alternating, from the same seed (torch's global generator,
as ADM's scripts draw it); the table gives ms per step (median of ``--rounds``), the speedup over ADM's
loop, and max |Δ| of the samples against ADM's loop with ADM's own cond_fn (the EDS rows compute another
guidance, so they differ by design). Random weights (with ADM's zero-initialised layers made random).

    python scripts/adm_drop_in.py --adm PATH/TO/guided-diffusion [--out table.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fastguide as fg
from fastguide.files import atomic_write


def _randomize(*nets):
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                if not p.any():
                    p.normal_(0, 0.05)


def _adm_cond_fn(classifier, scale):
    """scripts/classifier_sample.py's cond_fn."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def classifier_sample(su, args):
    flags = su.model_and_diffusion_defaults()
    flags.update(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="32,16,8",
                 num_head_channels=32, learn_sigma=True, class_cond=True, timestep_respacing=args.respacing,
                 use_scale_shift_norm=True, resblock_updown=True)  # fmt: skip
    model, diffusion = su.create_model_and_diffusion(**flags)
    cflags = su.classifier_defaults()
    cflags.update(image_size=64, classifier_width=64, classifier_depth=1)
    classifier = su.create_classifier(**cflags)
    _randomize(model, classifier)
    model.eval(), classifier.eval()
    y = torch.arange(args.batch) % 1000
    shape = (args.batch, 3, 64, 64)
    adm_cond, eds = _adm_cond_fn(classifier, args.scale), fg.adm.eds_cond_fn(classifier, args.scale, diffusion)
    fast = fg.adm.accelerate(diffusion)
    compiled = fg.adm.accelerate(diffusion, fg.SamplerConfig(compile=True))
    loop = "ddim_sample_loop" if args.respacing.startswith("ddim") else "p_sample_loop"

    def run(diff, cond):
        return lambda: getattr(diff, loop)(model, shape, cond_fn=cond, model_kwargs={"y": y})

    return diffusion.num_timesteps, {
        "ADM's loop, ADM's cond_fn (as is)": (run(diffusion, adm_cond), True),
        "cond_fn = eds_cond_fn(...)": (run(diffusion, eds), False),
        "diffusion = accelerate(diffusion)": (run(fast, adm_cond), True),
        "both lines": (run(fast, eds), False),
        "accelerate(diffusion, SamplerConfig(compile=True)), ADM's cond_fn": (run(compiled, adm_cond), True),
        "accelerate(diffusion, SamplerConfig(compile=True)), eds_cond_fn": (run(compiled, eds), False),
    }


def _unguided(args, model, diffusion, model_kwargs):
    """The contenders of a script without a classifier: ADM's loop, and accelerate with and without compile."""
    _randomize(model)
    model.eval()
    shape = (args.batch, 3, 64, 64)
    loop = "ddim_sample_loop" if args.respacing.startswith("ddim") else "p_sample_loop"

    def run(diff):
        return lambda: getattr(diff, loop)(model, shape, model_kwargs=model_kwargs)

    return diffusion.num_timesteps, {
        "ADM's loop (as is)": (run(diffusion), True),
        "diffusion = accelerate(diffusion)": (run(fg.adm.accelerate(diffusion)), True),
        "accelerate(diffusion, SamplerConfig(compile=True))": (
            run(fg.adm.accelerate(diffusion, fg.SamplerConfig(compile=True))), True),
    }  # fmt: skip


def image_sample(su, args):
    flags = su.model_and_diffusion_defaults()
    flags.update(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="32,16,8",
                 num_head_channels=32, learn_sigma=True, class_cond=True, timestep_respacing=args.respacing)  # fmt: skip
    model, diffusion = su.create_model_and_diffusion(**flags)
    return _unguided(args, model, diffusion, {"y": torch.arange(args.batch) % 1000})


def super_res_sample(su, args):
    flags = su.sr_model_and_diffusion_defaults()
    flags.update(large_size=64, small_size=32, num_channels=64, num_res_blocks=1, attention_resolutions="8",
                 num_head_channels=32, learn_sigma=True, timestep_respacing=args.respacing)  # fmt: skip
    model, diffusion = su.sr_create_model_and_diffusion(**flags)
    g = torch.Generator().manual_seed(5)
    return _unguided(args, model, diffusion, {"low_res": torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1})


SCRIPTS = {"classifier_sample.py": classifier_sample, "image_sample.py": image_sample,
           "super_res_sample.py": super_res_sample}  # fmt: skip


def measure(steps: int, runs: dict, rounds: int) -> list[tuple[str, float, float, float | None]]:
    """(contender, ms/step, speedup over the first, max |Δ| to the first or None) per contender."""
    samples, times = {}, {name: [] for name in runs}
    for name, (run, _) in runs.items():  # warm-up (compilation), and the samples compared
        torch.manual_seed(0)
        samples[name] = run()
    for _ in range(rounds):
        for name, (run, _) in runs.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base_name = next(iter(runs))
    base = statistics.median(times[base_name])
    rows = []
    for name, (_, same) in runs.items():
        median = statistics.median(times[name])
        delta = float((samples[name] - samples[base_name]).abs().max()) if same else None
        rows.append((name, 1000 * median / steps, base / median, delta))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adm", required=True, type=Path, help="an ADM checkout: the folder holding guided_diffusion/")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="which of " + ", ".join(SCRIPTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--respacing", default="ddim25", help="ADM's --timestep_respacing")
    parser.add_argument("--scale", type=float, default=1.0, help="ADM's --classifier_scale (EDS: γ)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if not (args.adm / "guided_diffusion" / "script_util.py").is_file():
        parser.error(f"--adm {args.adm}: no guided_diffusion/script_util.py there")
    names = args.scripts.split(",")
    for name in names:
        if name not in SCRIPTS:
            parser.error(f"--scripts: unknown script {name!r}; expected some of {', '.join(SCRIPTS)}")
    sys.path.insert(0, str(args.adm.resolve()))
    from guided_diffusion import script_util as su

    lines = [f"guided_diffusion from {Path(su.__file__).parent}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; batch {args.batch}, --timestep_respacing {args.respacing}", "",
             "| script | contender | ms/step | speedup | max \\|Δ\\| to ADM's samples |",
             "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for name in names:
        steps, runs = SCRIPTS[name](su, args)
        for contender, ms, speedup, delta in measure(steps, runs, args.rounds):
            shown = "(other guidance)" if delta is None else f"{delta:.1e}"
            lines.append(f"| {name} | {contender} | {ms:.1f} | {speedup:.2f}× | {shown} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
