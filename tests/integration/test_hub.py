"""Models and datasets named by a Hugging Face hub id (model.name_or_path=org/name, data.path=org/name):
read from the cache when the hub cannot be reached, and each way of not getting one (no network,
offline mode, no such or a private model, a gated one, a repository without config.json) is a one-line
error that says what to do. No test here touches the network: the hub's host name is made not to
resolve, or the download raises."""
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError)

from qlora.cli import main
from qlora.errors import UserError
from qlora.hub import check_hub_model
from tests.conftest import tiny_overrides

HOST = "huggingface.co"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty hub cache, online mode, no proxy, and a hub whose host name does not resolve; returns the
    list of lookups of that name."""
    lookups, resolve = [], socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == HOST:
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # and restored after the test, which may set it
    monkeypatch.setattr(constants, "ENDPOINT", f"https://{HOST}")
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    return lookups


def put_in_cache(folder, repo_id: str) -> None:
    """The model folder as repo_id's main revision in the hub cache, laid out as huggingface_hub lays it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_cached_hub_model_trains_with_the_hub_unreachable(no_hub, tiny_model, tiny_data, tmp_path, capsys):
    """The run says it reads the cache, and nothing asks for the hub's address after the first check:
    without offline mode, transformers would try the network (with retries) for each file."""
    put_in_cache(tiny_model, "org/tiny")
    code = main(["train", *tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{
        "model.name_or_path": "org/tiny", "train.max_steps": 2})])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"the Hugging Face hub cannot be reached ({HOST} does not resolve): reading org/tiny from the cache" in err
    assert no_hub == [HOST]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_notebook_call_that_went_offline_leaves_the_next_call_online(no_hub, tiny_model, tiny_data, tmp_path):
    """api.train reads a cached model offline; the kernel's next call asks the hub again, and is told the
    hub cannot be reached, not that HF_HUB_OFFLINE is set (which the user never set)."""
    from qlora import api

    put_in_cache(tiny_model, "org/tiny")
    api.train(*tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{
        "model.name_or_path": "org/tiny", "train.max_steps": 1}))
    assert constants.HF_HUB_OFFLINE is False
    with pytest.raises(UserError, match=f"not in the Hugging Face cache, and the hub cannot be reached: {HOST} does"):
        api.load(model="org/missing")
    assert no_hub == [HOST, HOST]


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_model_neither_cached_nor_reachable_is_refused_with_what_to_do(no_hub, monkeypatch, tiny_data,
                                                                          tmp_path, capsys, offline):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    code = main(["train", *tiny_overrides(tmp_path, tiny_data, tmp_path / "run", **{
        "model.name_or_path": "org/missing"})])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached: {HOST} does not resolve"
    assert f"model.name_or_path=org/missing: not in the Hugging Face cache, and {why}; " in err
    assert "`hf download org/missing`" in err and constants.HF_HUB_CACHE in err
    assert not (tmp_path / "run").exists()


def failing(cls, message="the hub said no"):
    """An instance of one of huggingface_hub's errors, without the HTTP response its constructor takes."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize("error, words", [
    (failing(GatedRepoError), "a gated model; accept its terms at https://huggingface.co/org/name, then log in"),
    (failing(RepositoryNotFoundError), "no such model on the Hugging Face hub, or a private one; check the name"),
    (failing(RemoteEntryNotFoundError), "the hub repository has no config.json, so it is not a transformers model"),
    (LocalEntryNotFoundError("connection timed out"),
     "could not fetch its config.json from the hub (connection timed out); fetch it where there is a network"),
])
def test_what_the_hub_answers_becomes_one_line_with_the_fix(no_hub, monkeypatch, error, words):
    import huggingface_hub

    def download(*args, **kwargs):
        raise error

    monkeypatch.setattr("qlora.hub.hub_unreachable", lambda: None)  # as if the host resolved
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(UserError, match="^model.name_or_path=org/name: ") as caught:
        check_hub_model("org/name")
    assert words in str(caught.value)


def test_a_malformed_hub_id_is_refused_before_any_lookup(no_hub):
    with pytest.raises(UserError, match="not a folder here, and not a valid hub id"):
        check_hub_model("org/two words")
    assert no_hub == []


def test_a_hub_dataset_with_the_hub_unreachable_is_read_from_the_cache_only(no_hub):
    """data.path=org/name: where the hub's host does not resolve, datasets goes offline at once (its
    retries, file by file, took ~25 s each) and the error says why it found nothing."""
    import sys

    from qlora.config import DataConfig
    from qlora.data import read_examples

    with pytest.raises(UserError) as caught:
        read_examples("org/dataset", DataConfig())
    message = str(caught.value)
    assert message.startswith("data.path=org/dataset: not a local file, folder or glob, and loading it as a Hugging")
    assert message.endswith(f"; the hub cannot be reached ({HOST} does not resolve), so only the datasets cache "
                            "was read")
    assert no_hub == [HOST] and sys.modules["datasets.config"].HF_HUB_OFFLINE
