"""Shared fixtures: one real Tansu broker for the whole run, the real SmolLM2 tokenizer/model, a tiny model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ktoloop import data
from ktoloop.config import BrokerConfig

CACHE_DIR = Path(os.environ.get("KTOLOOP_CACHE", Path.home() / ".cache" / "ktoloop"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _config_env_stays_in_its_test():
    """``ktoloop --config F`` exports $KTOLOOP_CONFIG for the flows it starts: one test's file (maybe a
    deliberately broken one) must not become the next test's configuration."""
    saved = {k: os.environ.get(k) for k in ("KTOLOOP_CONFIG", "KTOLOOP_HOME", "KTOLOOP_BOOTSTRAP")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A real Kafka-protocol broker (Tansu) on a free loopback port, started once per test session."""
    from ingest.broker import LocalBroker

    local = LocalBroker(BrokerConfig(port=free_port()), tmp_path_factory.mktemp("broker"))
    local.start()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct materialised once per machine into safetensors (~20 s the first time)."""
    from training.modeling import materialize_smollm2

    return materialize_smollm2(CACHE_DIR / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer and chat template, read from the GGUF: no 517 MB model is materialised."""
    from transformers import AutoTokenizer

    from training.modeling import smollm2_gguf_path

    gguf, out = smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 16-wide random Llama with the real SmolLM2 tokenizer and chat template."""
    from training.modeling import random_llama_dir as build

    return build(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir=smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder packaged in ktoloop/data; always present, so tests that read real data never skip."""
    return data.packaged_dir()
