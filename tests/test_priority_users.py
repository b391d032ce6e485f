"""Other readers of ``Request.priority``: LMCache's ``priority_limit`` is found wherever
LMCache would read it, and PARSScheduler warns about it at start-up (docs/ARCHITECTURE.md,
"Other users of priority"). vLLM's real ``KVTransferConfig`` is used; LMCache itself is
not installed here, so the connector is never built."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from vllm.config import KVTransferConfig

from pars_fast.vllm.scheduler import _warn_about_other_priority_users, lmcache_priority_limit


def kv(connector: str, **extra) -> KVTransferConfig:
    return KVTransferConfig(kv_connector=connector, kv_role="kv_both", kv_connector_extra_config=extra)


def multi(*entries: dict) -> KVTransferConfig:
    return kv("MultiConnector", connectors=list(entries))


def test_no_lmcache_connector_means_no_limit(tmp_path):
    env = {"LMCACHE_PRIORITY_LIMIT": "5"}
    assert lmcache_priority_limit(None, env) is None
    assert lmcache_priority_limit(kv("NixlConnector", **{"lmcache.priority_limit": 5}), env) is None
    # The multi-process connector has no such gate.
    assert lmcache_priority_limit(kv("LMCacheMPConnector"), env) is None


def test_limit_from_each_place_lmcache_reads(tmp_path):
    yaml_file = tmp_path / "lmcache.yaml"
    yaml_file.write_text("chunk_size: 256\npriority_limit: 7\n")
    lmcache = kv("LMCacheConnectorV1")
    assert lmcache_priority_limit(lmcache, {}) is None
    assert lmcache_priority_limit(lmcache, {"LMCACHE_CONFIG_FILE": str(yaml_file)}) == 7
    assert lmcache_priority_limit(lmcache, {"LMCACHE_PRIORITY_LIMIT": "3", "LMCACHE_CONFIG_FILE": str(yaml_file)}) == "3"
    extra = kv("LMCacheConnectorV1", **{"lmcache.priority_limit": 1})
    assert lmcache_priority_limit(extra, {"LMCACHE_PRIORITY_LIMIT": "3"}) == 1  # the connector's config wins
    # 0 is a limit (it skips every request with a positive priority), not "unset".
    assert lmcache_priority_limit(kv("LMCacheConnectorV1", **{"lmcache.priority_limit": 0}), {}) == 0
    # Keys without the prefix are not applied by LMCache, so they are not a limit.
    assert lmcache_priority_limit(kv("LMCacheConnectorV1", priority_limit=1), {}) is None


def test_limit_inside_a_multi_connector():
    nixl = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    lmcache = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
               "kv_connector_extra_config": {"lmcache.priority_limit": 2}}
    assert lmcache_priority_limit(multi(nixl, lmcache), {}) == 2
    assert lmcache_priority_limit(multi(nixl), {"LMCACHE_PRIORITY_LIMIT": "3"}) is None


def test_unreadable_config_file_is_no_limit(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("priority_limit: [unclosed\n")
    lmcache = kv("LMCacheConnectorV1")
    assert lmcache_priority_limit(lmcache, {"LMCACHE_CONFIG_FILE": str(bad)}) is None
    assert lmcache_priority_limit(lmcache, {"LMCACHE_CONFIG_FILE": str(tmp_path / "missing.yaml")}) is None


@pytest.mark.parametrize("limit", [None, 100])
def test_start_up_warns_only_when_a_limit_is_set(caplog, monkeypatch, limit):
    monkeypatch.delenv("LMCACHE_PRIORITY_LIMIT", raising=False)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    extra = {} if limit is None else {"lmcache.priority_limit": limit}
    config = SimpleNamespace(kv_transfer_config=kv("LMCacheConnectorV1", **extra))
    with caplog.at_level(logging.WARNING, logger="pars_fast.vllm"):
        _warn_about_other_priority_users(config)
    warned = [r for r in caplog.records if "priority_limit" in r.getMessage()]
    assert len(warned) == (limit is not None)
    if warned:
        assert "priority_limit=100" in warned[0].getMessage()
