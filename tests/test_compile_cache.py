"""fastguide.compile_cache: the compiled step's caches go where the user's cache lives, unless the user chose."""

from __future__ import annotations

import contextlib
import os

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from fastguide import compile_cache


def test_torchs_default_is_replaced_by_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for unset in (None, default_cache_dir()):  # no value, or the one torch sets itself when it reads it
        if unset is None:
            monkeypatch.delenv(compile_cache.ENV, raising=False)
        else:
            monkeypatch.setenv(compile_cache.ENV, unset)
        folder = compile_cache.use_user_cache()
        assert folder == str(tmp_path / "fastguide" / "torchinductor") == os.environ[compile_cache.ENV]
        assert os.path.isdir(folder)


def test_without_xdg_the_folder_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.user_cache_dir() == tmp_path / ".cache" / "fastguide" / "torchinductor"


def test_a_folder_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.use_user_cache() == str(tmp_path / "mine")
    assert not (tmp_path / "xdg").exists()


def test_an_unusable_cache_folder_leaves_torchs_default(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.use_user_cache() == os.path.abspath(default_cache_dir())
    assert compile_cache.ENV not in os.environ


def _compile_autocast_graph(cacheable: bool) -> dict:
    lin = torch.nn.Linear(8, 8).requires_grad_(False)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x)
        return h.float().sum(1)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with compile_cache.cacheable_autocast() if cacheable else contextlib.nullcontext():
        torch.compile(f, fullgraph=True)(torch.randn(4, 8))
    return dict(torch._dynamo.utils.counters["aot_autograd"])


def test_a_graph_that_enters_autocast_is_cached_while_the_step_compiles(monkeypatch, tmp_path):
    """The AOT-autograd cache refuses a graph with autocast regions (a warm start would trace it again);
    inside cacheable_autocast it keeps it."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    assert _compile_autocast_graph(cacheable=False).get("autograd_cache_bypass", 0) == 1
    first, second = _compile_autocast_graph(cacheable=True), _compile_autocast_graph(cacheable=True)
    assert first.get("autograd_cache_saved", 0) == 1 and second.get("autograd_cache_hit", 0) == 1, (first, second)
