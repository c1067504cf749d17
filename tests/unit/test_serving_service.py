"""The edge service: which adapter serves whom, batching of concurrent requests, reloading a newer run."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from fed_netgpt.config import ServingConfig
from fed_netgpt.run.folder import save_adapters, start_run
from fed_netgpt.serving.catalog import UnknownTarget, run_catalog
from fed_netgpt.serving.edge import EdgeService, PromptTooLong
from tests.serving_runs import random_state, serving_config, write_run

SETTINGS = ServingConfig(precision="fp32", max_new_tokens=6, max_wait_ms=50.0, reload_seconds=0.05,
                         max_prompt_tokens=40)


@pytest.fixture
def run(tmp_path: Path, tiny_base) -> Path:
    write_run(tmp_path / "run", tiny_base, seed=0)
    return tmp_path / "run"


def test_each_site_gets_its_own_adapter_else_its_regions(run: Path) -> None:
    catalog, _ = run_catalog(run)
    assert catalog.resolve("paris").adapter == run / "site_adapters" / "paris"  # personalized
    assert catalog.resolve("marseille").adapter == run / "adapters" / "france"
    assert catalog.resolve("tokyo", "japan").adapter == run / "adapters" / "japan"
    kyoto = catalog.resolve("kyoto", "japan")  # a site the run never saw: cold start with its region's adapter
    assert (kyoto.adapter, kyoto.region, kyoto.context) == (run / "adapters" / "japan", "japan", "")
    assert catalog.model_names()[:3] == ["tiny-random", "france", "japan"]
    assert {"paris", "marseille", "tokyo", "yokohama"} <= set(catalog.model_names())
    assert catalog.slot(catalog.model("tiny-random")) == 0
    assert len({catalog.slot(catalog.resolve(s)) for s in ("paris", "marseille", "tokyo")}) == 3


@pytest.mark.parametrize(("site", "region", "message"), [
    ("atlantis", "", "unknown site 'atlantis'; pass its region"),
    ("atlantis", "mars", "region 'mars' has no adapter in the run; regions served: france, japan"),
    ("paris", "japan", "site 'paris' is in region 'france', not 'japan'"),
])
def test_an_unknown_site_or_region_is_named(run: Path, site: str, region: str, message: str) -> None:
    catalog, _ = run_catalog(run)
    with pytest.raises(UnknownTarget, match=message):
        catalog.resolve(site, region)


def test_concurrent_requests_are_batched_and_answer_as_they_would_alone(run: Path) -> None:
    service = EdgeService(SETTINGS, run=run)
    try:
        sites = ["paris", "marseille", "tokyo", "yokohama"] * 3
        alone = [service.complete("Where can I eat?", site).text for site in sites[:4]]
        with ThreadPoolExecutor(len(sites)) as pool:
            together = list(pool.map(lambda site: service.complete("Where can I eat?", site), sites))
        assert [c.text for c in together] == alone * 3
        assert max(service.batch_sizes) > 1  # at least some requests shared a forward pass
        assert {c.adapter for c in together} == {"paris", "france", "japan"}
        with pytest.raises(PromptTooLong, match="limit is serving.max_prompt_tokens=40"):
            service.complete("word " * 60, "paris")
        assert service.complete("Where can I eat?", "paris").text == alone[0]  # the worker lives on
    finally:
        service.close()


def test_a_newer_run_is_served_once_it_is_published_and_not_before(run: Path, tiny_base) -> None:
    service = EdgeService(SETTINGS, run=run)
    try:
        before = service.complete("Where can I eat?", "marseille").text
        config = serving_config(run)
        start_run(config)  # a new run starts in the folder: adapters/ is gone, published.json too
        time.sleep(0.3)
        assert service.reloads == 0 and service.complete("Where can I eat?", "marseille").text == before
        save_adapters(run, tiny_base, config, {region: random_state(tiny_base, config, 7 + k)
                                               for k, region in enumerate(("france", "japan"))})
        deadline = time.time() + 10
        while service.reloads == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert service.reloads == 1
        after = service.complete("Where can I eat?", "marseille")
        assert after.text != before and after.adapter == "france"
        assert service.catalog.resolve("paris").adapter == run / "adapters" / "france"  # no site adapter any more
    finally:
        service.close()


def test_a_batch_whose_pass_fails_answers_each_request_alone(run: Path, monkeypatch) -> None:
    # Prepare: a fault injected into the engine: a pass over several rows decodes, then fails (as a kernel or an
    # allocation can at the end of a long batch); a pass over one row works. The batch waits long enough for all
    service = EdgeService(replace(SETTINGS, max_wait_ms=300.0), run=run)
    decode = service.engine.generate_rows
    failed_passes = []

    def failing_when_batched(rows):
        result = decode(rows)
        if len(rows) > 1:
            failed_passes.append(len(rows))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return result

    try:
        sites = ["paris", "marseille", "tokyo", "yokohama"]
        alone = [service.complete("Where can I eat?", site).text for site in sites]
        monkeypatch.setattr(service.engine, "generate_rows", failing_when_batched)
        streamed: list[str] = []

        def ask(site: str):
            on_text = streamed.append if site == "stream" else None
            try:
                return service.complete("Where can I eat?", "tokyo" if site == "stream" else site, on_text=on_text)
            except RuntimeError as err:
                return err

        # Execute: the four sites and a streaming request, at once
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(ask, [*sites, "stream"]))
    finally:
        service.close()

    # Assert: a batch pass failed, and every request that had sent nothing was answered as it is alone; the one
    # whose first words had already reached its client keeps the error (sending them again would repeat them)
    assert failed_passes and max(failed_passes) > 1
    texts = [a.text if not isinstance(a, Exception) else a for a in answers]
    assert texts[:4] == alone
    assert streamed and isinstance(answers[4], RuntimeError) and "illegal memory access" in str(answers[4])
