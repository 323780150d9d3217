"""Schemathesis over the server's own OpenAPI schema: every operation, valid and invalid inputs,
a bounded number of examples each; what matters is that no request gets a 5xx."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


@dataclass
class FuzzResult:
    operations: int = 0
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)  # "METHOD path -> status: body"


def run_schemathesis(
    base_url: str, headers: dict[str, str] | None = None, max_examples: int = 10
) -> FuzzResult:
    """Fuzz every operation of `base_url`'s /schema with `max_examples` cases per mode."""
    raw = httpx.get(f"{base_url}/schema/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    result = FuzzResult()
    for op_result in schema.get_all_operations():
        operation = op_result.ok()
        result.operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=max_examples,
                deadline=None,
                derandomize=True,  # the same cases every run
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=120)
                result.requests += 1
                status = response.status_code
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status >= 500:
                    result.server_errors.append(
                        f"{case.method} {case.formatted_path} -> {status}: {response.text[:300]}"
                    )

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
                continue
    return result
