"""What ``GET /health`` reports: Triton (server and model ready), Milvus (reachable, collection, loaded), Dagster."""

from __future__ import annotations

from typing import Any

import requests

from embedding_pipeline.settings import Settings

PROBE_TIMEOUT_S = 2.0


def triton_health(settings: Settings) -> dict[str, Any]:
    """Triton's standard readiness endpoints (KServe v2), on its HTTP port whatever protocol inference uses."""
    t = settings.triton
    base = t.url if "://" in t.url else f"http://{t.url}"
    version = f"/versions/{t.model_version}" if t.model_version else ""
    out: dict[str, Any] = {"url": t.url, "model": t.model_name, "server_ready": False, "model_ready": False}
    try:
        with requests.Session() as session:
            session.trust_env = False  # a loopback probe must not go through a proxy
            out["server_ready"] = session.get(f"{base}/v2/health/ready", timeout=PROBE_TIMEOUT_S).status_code == 200
            model = session.get(f"{base}/v2/models/{t.model_name}{version}/ready", timeout=PROBE_TIMEOUT_S)
            out["model_ready"] = model.status_code == 200
    except requests.RequestException as exc:
        out["error"] = f"not reachable: {type(exc).__name__}"
    return out


def milvus_health(settings: Settings) -> dict[str, Any]:
    from embedding_pipeline.index.client import redact
    from embedding_pipeline.index.collections import ModelCollections

    m = settings.milvus
    out: dict[str, Any] = {
        "uri": redact(m.uri),
        "collection": m.collection,
        "reachable": False,
        "resolved_collection": None,
        "loaded": None,
    }
    try:
        with ModelCollections(m, connect_timeout=PROBE_TIMEOUT_S) as collections:
            target = collections.search_collection()
            out["reachable"] = True
            out["resolved_collection"] = target
            if target is not None:
                state = collections.client.get_load_state(target, timeout=PROBE_TIMEOUT_S)
                out["loaded"] = "Loaded" in str(state.get("state"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable now"
        out["error"] = str(exc)
    return out


def healthy(report: dict[str, Any]) -> bool:
    """Down is: Triton or its model not ready, Milvus unreachable, or the Dagster instance or webserver not
    answering. A collection that does not exist yet is not a fault (nothing was inserted yet)."""
    t, m, d = report["triton"], report["milvus"], report["dagster"]
    return bool(
        t.get("server_ready")
        and t.get("model_ready")
        and m.get("reachable")
        and d.get("instance_reachable")
        and d.get("webserver_reachable")
    )
