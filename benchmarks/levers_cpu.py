"""Issue 26's levers on the CPU, side by side: ADM's loop against the compiled step with one change each.

    python benchmarks/levers_cpu.py [case] [batch] [contenders] [respacing]   (ROUNDS=3 by default)

e.g. ``python benchmarks/levers_cpu.py embedded 16 adm,fast,freezing,channels_last,every2``. Contenders:
adm (ADM's loop), fast (the compiled step, precision "auto"), eager-bf16, freezing (inductor freezing, the
compiled step called under no_grad: a measurement hook on the sampler's private runner, not a feature),
channels_last, freezing+cl, max-autotune, every2 (guidance_every=2), sdpa (the attention
traced as SDPA, as before the compiled step's attention kept the networks' dtype). Prints a Markdown table
(benchmarks/RESULTS.md).
"""
import contextlib, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import e2e
import fastguide as fg

case_name = sys.argv[1] if len(sys.argv) > 1 else "embedded"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
which = (sys.argv[3] if len(sys.argv) > 3 else "adm,fast,freezing,channels_last,every2").split(",")
respacing = sys.argv[4] if len(sys.argv) > 4 else "ddim25"
case = e2e.cases()[case_name]
cpu = torch.device("cpu")
unet, clf = e2e.networks(case, cpu)

import fastguide.compiled as fc  # noqa: E402

# the measurement hook for freezing: inductor freezes only graphs compiled with grad off, and the sampler
# turns grad on per step (inference_mode(False)); the compiled step is called under no_grad here
_orig_compiled, _orig_init = fc.StepRunner._compiled, fc.StepRunner.__init__
FREEZE = {"on": False}


def _frozen_compiled(self, guidance, args):
    fn = _orig_compiled(self, guidance, args)
    if not self.freeze:
        return fn

    def call(*a):
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return fn(*a)

    return call


def _init(self, *a, **k):
    _orig_init(self, *a, **k)
    self.freeze = FREEZE["on"]


fc.StepRunner._compiled, fc.StepRunner.__init__ = _frozen_compiled, _init


def lever(config_patch=None, freeze=False, sdpa=False, **cfg):
    """The compiled step of GuidedSampler with ``cfg``; ``config_patch``: inductor options while it compiles
    (its first run); ``freeze``: inductor freezing (the hook above); ``sdpa``: the attention traced as SDPA."""
    run = e2e.fastguide_loop(case, "ddim", respacing, unet, clf, compile=True, precision="auto", **cfg)
    state = {"first": True}

    def wrapped(x_T, y):
        FREEZE["on"] = freeze  # read when the runner is made, at the first run
        first = config_patch and state["first"]
        patch = torch._inductor.config.patch(**config_patch) if first else contextlib.nullcontext()
        import fastguide.adm.networks.nn as adm_nn

        attention = adm_nn.low_precision_attention
        try:
            if sdpa:  # at every run: dynamo guards on the global, and would recompile without it
                adm_nn.low_precision_attention = adm_nn.sdpa_attention
            with patch:
                return run(x_T, y)
        finally:
            adm_nn.low_precision_attention = attention
            FREEZE["on"], state["first"] = False, False

    return wrapped


make = {
    "adm": lambda: e2e.contenders(case, "ddim", respacing, cpu, ("adm",))["adm"],
    "eager-bf16": lambda: e2e.fastguide_loop(case, "ddim", respacing, unet, clf, compile=False, precision="bfloat16"),
    "fast": lambda: lever(),
    "freezing": lambda: lever(freeze=True),
    "channels_last": lambda: lever(channels_last=True),
    "freezing+cl": lambda: lever(freeze=True, channels_last=True),
    "max-autotune": lambda: lever(dict(max_autotune=True)),
    "every2": lambda: lever(guidance_every=2),
    "sdpa": lambda: lever(sdpa=True),
}
runs = {n: make[n]() for n in which}
_, x_T, y, steps = e2e.setup(case_name, batch, "ddim", respacing, "cpu", ())
t0 = time.time()
timings = e2e.time_side_by_side(runs, x_T, y, steps, rounds=int(os.environ.get("ROUNDS", 3)))
base = timings["adm"].median_s if "adm" in timings else None
ref = timings["fast"].output if "fast" in timings else None
print(f"### {case_name} batch {batch} {respacing} ({fg.cpu.bf16_kind()}, {torch.get_num_threads()} threads)")
print("| contender | ms/step | x ADM | first run s | max |Δ| vs fast |")
for n, t in timings.items():
    d = (t.output - ref).abs().max().item() if ref is not None else float("nan")
    speedup = base / t.median_s if base else float("nan")
    print(f"| {n} | {t.ms_per_step:.1f} | {speedup:.2f} | {t.first_s:.1f} | {d:.2e} |")
print(f"total {time.time()-t0:.0f} s")
