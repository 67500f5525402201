"""The generated (Stainless) client shipped in the same `langsmith` package (`langsmith.Langsmith`):
it reads `items` + `next_cursor` and pages with `?cursor=` (spec §2.1.5, §2.2.3)."""

from __future__ import annotations

import pytest
from conftest import unique_name
from langsmith import Langsmith


@pytest.fixture
def gen(cordon):
    c = Langsmith(api_key=cordon.api_key, base_url=cordon.url, max_retries=0)
    yield c
    c.close()


def test_generated_list_pages_with_cursor(gen, make_sandbox):
    prefix = unique_name("paged")
    names = {make_sandbox(name=f"{prefix}-{i}").name for i in range(5)}
    page = gen.sandboxes.boxes.list(page_size=2, name_contains=prefix)
    assert len(page.items) == 2
    assert page.next_cursor
    seen = [box.name for box in page]  # auto-paginates through next_cursor
    assert sorted(seen) == sorted(names), "every sandbox exactly once across pages"


def test_generated_retrieve_and_status(gen, make_sandbox):
    sb = make_sandbox()
    got = gen.sandboxes.boxes.retrieve(sb.name)
    assert (got.name, got.id, got.status, got.dataplane_url) == (sb.name, sb.id, "ready", sb.dataplane_url)
