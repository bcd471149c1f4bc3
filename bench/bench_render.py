"""What bounding a render costs, option beside option (issue #20, item 4): how to keep a
hostile template from stalling the dispatcher's event loop. No stack needed; about a
minute of one core (``python bench/bench_render.py``, ``--quick`` for a tenth).

Options, each measured in this run:

* in-process: ``Renderer.render`` on the event loop, as the dispatcher rendered before
  (with the sandbox's output and operator checks, no time or memory limit): the
  baseline;
* (a) worker process: ``Renderer.render_bounded`` through ``jobrunner.rendering.sandbox``'s pool
  (what the dispatcher uses): killable on timeout, memory capped by RLIMIT_AS;
* (b) worker thread: ``asyncio.to_thread(Renderer.render)``: cannot be stopped, and a
  CPU-bound render holds the GIL against the event loop;
* (c) in-process ticking sandbox: a prototype environment whose every loop iteration
  and macro call checks a deadline (the "custom code generator" option), with the
  output counted while it streams; bounds time but not one big allocation.

Figures:

1. per-render cost of ordinary templates (the repository's ``job_templates/``, the
   operator tests' Job template, a template with filters and a loop): median and p95
   microseconds per Job, N renders one after another;
2. while one hostile render runs (nested loops, stopped after 1 s where the option can
   stop it): the event loop's worst lag (a 10 ms ticker), and how long until the render
   ends;
3. what each option does with ``'x'.center(10**9)`` (a single 1 GB allocation).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes as nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobrunner.core.models import Delivery  # noqa: E402
from jobrunner.manifest.loader import parse_scaledjob  # noqa: E402
from jobrunner.rendering.renderer import Renderer, RenderError  # noqa: E402
from jobrunner.rendering.sandbox import templates  # noqa: E402
from jobrunner.rendering.sandbox.pool import RenderPool  # noqa: E402
from jobrunner.rendering.sandbox.templates import RenderLimits  # noqa: E402

LIMITS = RenderLimits(seconds=1.0)
HOSTILE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
FINITE_HOSTILE = "{% for i in range(4000) %}{% for j in range(4000) %}{% endfor %}{% endfor %}"
"""For the worker thread, which nothing can stop: 16 million iterations."""


def scaledjob(job: dict[str, Any] | None = None, template: str | None = None) -> Any:
    spec: dict[str, Any] = {
        "triggers": [{"type": "rabbitmq", "metadata": {"queueName": "q", "host": "amqp://x/"}}]
    }
    if template:
        spec["jobTemplate"] = template
    else:
        spec["jobTargetRef"] = job
    return parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": spec,
        }
    )


def container_job(*args: str, **extra: Any) -> dict[str, Any]:
    return {
        "backoffLimit": 0,
        "template": {
            **extra,
            "spec": {"containers": [{"name": "work", "image": "busybox:1.36", "args": list(args)}]},
        },
    }


TEMPLATES = {
    "job_templates/echo-job.yaml": lambda: scaledjob(template="echo-job.yaml"),
    "tests' operator job_spec": lambda: scaledjob(
        container_job(
            "v1 {{ message.json.task }}",
            metadata={
                "annotations": {
                    "kwok.jobrunner.dev/run-duration": "{{ message.json.get('seconds', 0) }}s"
                }
            },
        )
    ),
    "filters and a loop": lambda: scaledjob(
        container_job(
            "{{ message.json.task|upper|replace('-', '_') }}",
            "{% for k, v in message.json.items()|sort %}{{ k }}={{ v|tojson }} {% endfor %}",
            "{{ message.body|b64encode }}",
        )
    ),
}


def message(i: int) -> Delivery:
    body = f'{{"task": "t-{i}", "seconds": 3, "n": {i}}}'.encode()
    return Delivery(source="rabbitmq", identity=f"m-{i}", body=body, message_id=f"m-{i}")


# ---------------------------------------------------------------------- option (c)
class _Expired(Exception):
    pass


class TickingSandbox(jinja2.sandbox.SandboxedEnvironment):
    """Prototype of option (c): every ``for`` iterates through ``tick_iter`` and every
    macro body starts with ``tick``, both checking a deadline (an AST rewrite before
    compiling, which is what a custom code generator would emit)."""

    deadline = float("inf")

    def tick(self) -> str:
        if time.monotonic() > self.deadline:
            raise _Expired()
        return ""

    def tick_iter(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            if time.monotonic() > self.deadline:
                raise _Expired()
            yield item

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("tick_iter"), [loop.iter], [], None, None
            )
        for macro in tree.find_all(nodes.Macro):
            call = nodes.Call(nodes.EnvironmentAttribute("tick"), [], [], None, None)
            macro.body.insert(0, nodes.Output([call]))
        return tree


class TickingRenderer:
    """Option (c) for a whole Job: the Renderer's own strings, rendered by the ticking
    environment with streamed output counting, then the same assembly."""

    def __init__(self, renderer: Renderer, seconds: float) -> None:
        self.renderer = renderer
        self.seconds = seconds
        self.env = TickingSandbox(undefined=jinja2.StrictUndefined, optimized=False)
        self.env.filters.update(templates.environment(kubelet_expanded=False).filters)
        self.compiled = [self.env.from_string(s) for s, _ in renderer._sources]

    def render(self, delivery: Delivery) -> Any:
        name, data = self.renderer._context(delivery)
        context = {
            "message": templates.MessageView(body=delivery.body, **data["message"]),
            "scaledjob": data["scaledjob"],
            "job": data["job"],
        }
        self.env.deadline = time.monotonic() + self.seconds
        left = LIMITS.output_bytes
        values = []
        try:
            for template in self.compiled:
                parts = []
                for chunk in template.generate(context):
                    left -= len(chunk)
                    if left < 0:
                        raise RenderError("TemplateError", "output")
                    parts.append(chunk)
                values.append("".join(parts))
        except _Expired:
            raise RenderError("TemplateError", "time") from None
        return self.renderer._assemble(delivery, name, values, {})


# ---------------------------------------------------------------------- measuring
async def per_render(render: Callable[[Delivery], Awaitable[Any]], count: int) -> list[float]:
    await render(message(0))  # warm: a worker started, templates compiled
    times = []
    for i in range(count):
        start = time.perf_counter()
        await render(message(i))
        times.append((time.perf_counter() - start) * 1e6)
    return times


async def under_attack(render: Callable[[], Awaitable[Any]]) -> tuple[float, float, str]:
    """(worst event-loop lag in ms, seconds until the render ended, how it ended)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.perf_counter() - before - 0.01) * 1000)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    try:
        await render()
        outcome = "finished (it cannot be stopped; this one was finite)"
    except RenderError as exc:
        outcome = f"stopped: {exc.detail[-60:]}"
    took = time.perf_counter() - start
    stop.set()
    await task
    return max(lags), took, outcome


def row(name: str, times: list[float], base: float | None) -> str:
    median = statistics.median(times)
    p95 = sorted(times)[int(0.95 * (len(times) - 1))]
    extra = f"  (+{median - base:7.1f} us vs in-process)" if base is not None else ""
    return f"    {name:32s} median {median:8.1f} us   p95 {p95:8.1f} us{extra}"


async def main(count: int) -> None:
    pool = RenderPool(LIMITS, workers=3, per_namespace=2)
    dirs = [ROOT / "job_templates"]
    print(f"per-render cost, {count} renders each (python {sys.version.split()[0]})")
    for label, make in TEMPLATES.items():
        local = Renderer(make(), base_dirs=dirs)
        pooled = Renderer(make(), base_dirs=dirs, pool=pool)
        ticking = TickingRenderer(Renderer(make(), base_dirs=dirs), LIMITS.seconds)

        async def here(d: Delivery, r: Renderer = local) -> Any:
            return r.render(d)

        async def thread(d: Delivery, r: Renderer = local) -> Any:
            return await asyncio.to_thread(r.render, d)

        async def tick(d: Delivery, t: TickingRenderer = ticking) -> Any:
            return t.render(d)

        print(f"  {label}")
        baseline = await per_render(here, count)
        base = statistics.median(baseline)
        print(row("in-process, no limits", baseline, None))
        print(
            row("(a) worker process (chosen)", await per_render(pooled.render_bounded, count), base)
        )
        print(row("(b) worker thread", await per_render(thread, count), base))
        print(row("(c) ticking sandbox", await per_render(tick, count), base))

    print("\none hostile render (nested range(100000) loops), limit 1 s:")
    hostile = scaledjob(container_job(HOSTILE))
    finite = Renderer(scaledjob(container_job(FINITE_HOSTILE)))
    pooled = Renderer(hostile, pool=pool)
    ticking = TickingRenderer(Renderer(hostile), LIMITS.seconds)

    async def on_loop_finite() -> Any:
        return finite.render(message(1))

    async def on_thread() -> Any:
        return await asyncio.to_thread(finite.render, message(1))

    async def on_ticking() -> Any:
        return ticking.render(message(1))

    cases = [
        ("in-process, finite version", on_loop_finite),
        ("(a) worker process", lambda: pooled.render_bounded(message(1))),
        ("(b) worker thread, finite version", on_thread),
        ("(c) ticking sandbox", on_ticking),
    ]
    for label, render in cases:
        lag, took, outcome = await under_attack(render)
        print(f"    {label:36s} loop lag {lag:8.1f} ms   render {took:6.2f} s   {outcome}")

    print("\n'x'.center(10**9), one 1 GB allocation:")
    center = Renderer(scaledjob(container_job("{{ 'x'.center(10**9)|length }}")), pool=pool)
    start = time.perf_counter()
    try:
        await center.render_bounded(message(2))
        print("    (a) worker process: rendered (!)")
    except RenderError as exc:
        print(f"    (a) worker process: {time.perf_counter() - start:.2f} s, {exc.detail[-70:]}")
    print(
        "    (b), (c) and in-process: allocate it in the dispatcher's own process "
        "(not run here: a bigger one is a MemoryError or the OOM killer)"
    )
    start = time.perf_counter()
    first = RenderPool(LIMITS, workers=1)
    await Renderer(TEMPLATES["tests' operator job_spec"](), pool=first).render_bounded(message(3))
    print(f"\nstarting a worker and its first render: {time.perf_counter() - start:.3f} s")
    await first.close()
    await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the renders")
    args = parser.parse_args()
    asyncio.run(main(200 if args.quick else 2000))
