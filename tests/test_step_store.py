"""fastguide.step_store: the compiled step kept between processes, found by a key of what decides its graph,
computing with the live networks, and never a stale one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

import fastguide as fg
from fastguide import step_store
from nets import tiny_nets

SCHEDULE = fg.Schedule.create("linear", 1000, "ddim3")
LABELS, SEEDS = [1, 2], [0, 1]


def make_sampler(gamma=2.0, weights_seed=None, compile=True, **cfg):
    unet, clf = tiny_nets()
    if weights_seed is not None:  # the same architecture with other weights
        gen = torch.Generator().manual_seed(weights_seed)
        with torch.no_grad():
            for p in [*unet.parameters(), *clf.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return fg.GuidedSampler(unet, clf, SCHEDULE, fg.EntropyDriven(gamma), fg.SamplerConfig(compile=compile, **cfg))


class Captured(Exception):
    pass


def key_of(sampler, monkeypatch, labels=LABELS) -> str:
    """The store's key of the sampler's first compiled step (nothing is compiled)."""

    def capture(step, lazy, args, external):
        raise Captured(step_store.step_key(step, args))

    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(step_store, "stored_or_compiled", capture)
    with pytest.raises(Captured) as got:
        sampler.sample(labels, seeds=list(range(len(labels))))
    return str(got.value)


def test_the_key_ignores_the_weights_and_names_everything_else(monkeypatch):
    base = key_of(make_sampler(), monkeypatch)
    assert key_of(make_sampler(weights_seed=1), monkeypatch) == base  # weights are the graph's inputs
    assert key_of(make_sampler(), monkeypatch) == base
    others = {
        "gamma": key_of(make_sampler(gamma=3.0), monkeypatch),
        "batch": key_of(make_sampler(), monkeypatch, labels=[1, 2, 3]),
        "solver": key_of(make_sampler(method="ddpm"), monkeypatch),
        "clipping": key_of(make_sampler(clip_denoised=False), monkeypatch),
    }
    sampler = make_sampler()
    sampler.model.num_heads_upsample += 1  # an attribute of a network
    others["network attribute"] = key_of(sampler, monkeypatch)
    sampler = make_sampler()
    sampler.schedule = fg.Schedule.create("cosine", 1000, "ddim3")  # other table values
    others["tables"] = key_of(sampler, monkeypatch)
    monkeypatch.setattr(step_store, "_package_hash", lambda: "fastguide's source changed")
    others["source"] = key_of(make_sampler(), monkeypatch)
    monkeypatch.undo()
    monkeypatch.setenv("FASTGUIDE_TEST_ONLY", "1")  # any FASTGUIDE_* variable
    others["environment"] = key_of(make_sampler(), monkeypatch)
    assert base not in others.values() and len(set(others.values())) == len(others), others


def test_the_key_is_the_same_in_another_process(monkeypatch):
    here = key_of(make_sampler(), monkeypatch)
    code = ("import sys, pytest; sys.path.insert(0, 'tests'); import test_step_store as t; "
            "mp = pytest.MonkeyPatch(); print(t.key_of(t.make_sampler(), mp))")  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "FASTGUIDE_COMPILE_BACKEND"}
    there = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert there.stdout.strip().splitlines()[-1] == here


def test_an_object_without_a_stable_name_gives_a_key_of_this_process_only(monkeypatch):
    class Opaque:
        def __repr__(self):
            return f"<Opaque at 0x{id(self):x}>"

    def digest(obj):
        walk = step_store._Walk()
        walk(obj)
        return walk.h.hexdigest()

    value = b"no __dict__ to walk"
    opaque = [memoryview(value), memoryview(value)]  # reprs with their addresses
    assert digest(opaque[0]) == digest(opaque[1])  # the address is not hashed...
    here = digest(opaque[0])
    monkeypatch.setattr(step_store, "_PROCESS_ONLY", "yet another process")
    assert digest(opaque[0]) != here  # ...the process's own random token is: no other process finds the key
    assert digest(Opaque()) == digest(Opaque())  # an object with attributes is walked, not named by its repr


def test_a_stored_step_whose_traced_source_changed_is_not_used(tmp_path, monkeypatch):
    """A helper module that the network's forward calls (not named by the key) changes: the step recorded
    its source, and the changed module refuses it."""
    from torch._dynamo.package import InlinedSource, SourceInfo

    helper = tmp_path / "fastguide_store_helper.py"
    helper.write_text("SCALE = 2.0\n\n\ndef act(x):\n    return x * SCALE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fastguide_store_helper as module

    class Compiled:
        def __init__(self, content):
            info = SourceInfo(inlined_sources=set())
            info.inlined_sources.add(InlinedSource(module.__name__, 4, 6, "", content))
            self.info = info

        def source_info(self):
            return self.info

    import inspect

    recorded = inspect.getsource(module)
    assert step_store.sources_unchanged(Compiled(recorded))
    helper.write_text(recorded.replace("2.0", "3.0"))  # a constant of the module, not of the traced function
    assert not step_store.sources_unchanged(Compiled(recorded))
    monkeypatch.delitem(sys.modules, module.__name__)
    assert not step_store.sources_unchanged(Compiled(recorded))  # not imported: not used


def test_a_refused_guard_falls_back_to_the_ordinary_compilation():
    class Compiled:
        def __init__(self):
            self.checked = self.calls = 0

        def disable_guard_check(self):
            pass

        def guard_check(self, *args):
            self.checked += 1
            return args[0] == "fits"

        def __call__(self, *args):
            self.calls += 1
            return "stored"

    compiled = Compiled()
    stored = step_store.StoredStep(compiled, lambda *args: "compiled as usual", "loaded")
    assert stored("fits") == "stored"
    assert stored("other shape") == "compiled as usual"
    assert stored("fits") == "compiled as usual"  # from then on
    assert compiled.calls == 1


def _step_of(sampler):
    (runner,) = sampler._runners.values()
    return runner.compiled["call"]


class SmallEps(torch.nn.Module):
    """A small eps-model: the store's test compiles in seconds, not minutes (ADM's tiny networks: 80 s)."""

    in_channels, image_size = 3, 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


class SmallClassifier(torch.nn.Module):
    in_channels, image_size = 3, 8

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)

    def forward(self, x, t):
        return self.head(torch.nn.functional.silu(self.conv(x)).mean((2, 3)))


def small_sampler(weights_seed: int, compile=True) -> fg.GuidedSampler:
    torch.manual_seed(weights_seed)
    eps, clf = SmallEps().eval(), SmallClassifier().eval()
    return fg.GuidedSampler(eps, clf, SCHEDULE, fg.EntropyDriven(2.0), fg.SamplerConfig(compile=compile))


def test_a_stored_step_replaces_a_bad_file_and_is_loaded_with_the_live_weights(monkeypatch, tmp_path):
    """Inductor on the CPU: the first sampler finds a damaged file under its key, compiles ahead of time and
    replaces it (with the umask's mode); a sampler of the same architecture with other weights loads the
    step and samples with its own weights, not the first sampler's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        key = key_of(small_sampler(0), mp)
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "inductor")  # as key_of had it: the key's environment
    path = tmp_path / step_store.FOLDER / f"{key}.bin"
    path.parent.mkdir()
    path.write_bytes(b"not a compiled step")
    torch._dynamo.reset()
    first = small_sampler(0)
    first_images = first.sample(LABELS, seeds=SEEDS).images
    assert _step_of(first).source == "saved" and path.stat().st_size > 1000
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    torch._dynamo.reset()
    other = small_sampler(1)
    images = other.sample(LABELS, seeds=SEEDS).images
    assert _step_of(other).source == "loaded"
    traced = {source.module for source in _step_of(other).compiled.source_info().inlined_sources}
    assert {__name__, "fastguide.step", "fastguide.solvers.ddim"} <= traced, traced  # what sources_unchanged checks
    eager = small_sampler(1, compile=False).sample(LABELS, seeds=SEEDS).images
    first_eager = small_sampler(0, compile=False).sample(LABELS, seeds=SEEDS).images
    torch.testing.assert_close(first_images, first_eager, rtol=0, atol=1e-5)  # compiled vs eager: rounding
    torch.testing.assert_close(images, eager, rtol=0, atol=1e-5)
    assert (images - first_images).abs().max() > 0.1  # the live weights, not the first sampler's
    assert list(path.parent.iterdir()) == [path]


def test_with_the_store_off_the_step_compiles_as_usual(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(step_store.ENV, "0")

    def step(x):
        return x + 1

    lazy = object()
    assert step_store.stored_or_compiled(step, lazy, (torch.zeros(2),), {}) is lazy
    assert not (tmp_path / step_store.FOLDER).exists()
