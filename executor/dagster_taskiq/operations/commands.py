"""The operations commands: ``status``, ``runs show``, ``dlq list|show|purge``, ``logs``.

They find the deployment from the environment (see ``operations.target``): the stack's
outputs on AWS, or ``DAGSTER_TASKIQ_LOCAL_STACK`` for a local stack.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_DLQ_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_LOCAL_STACK,
    ENV_QUEUE_URL,
    ENV_STACK_OUTPUTS,
)

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from dagster_taskiq.core.ledger import Ledger
    from dagster_taskiq.operations.target import Target

WHERE = (
    f"The deployment comes from the environment: on AWS the stack's outputs (${ENV_QUEUE_URL}, "
    f"${ENV_DLQ_URL}, ${ENV_ECS_CLUSTER}, ${ENV_ECS_SERVICE}, ${ENV_DATABASE_URL}, or "
    f"${ENV_STACK_OUTPUTS} for a `cdk deploy --outputs-file` file); a local stack's "
    f"directory in ${ENV_LOCAL_STACK}."
)


def _console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # a pipe or a file: room for the wide tables
    return console


@contextmanager
def _deployment(*, need_queues: bool = True) -> Iterator[tuple[Target, Ledger | None]]:
    from dagster_taskiq.core.errors import ConfigurationError
    from dagster_taskiq.core.ledger import Ledger
    from dagster_taskiq.operations.target import resolve_target

    try:
        target = resolve_target(need_queues=need_queues)
    except ConfigurationError as e:
        raise click.ClickException(str(e)) from e
    ledger = Ledger(target.database_url, pool_size=1) if target.database_url else None
    try:
        yield target, ledger
    finally:
        if ledger is not None:
            ledger.dispose()


def _show(
    console: Console,
    produce: Callable[[], Any],
    render: Callable[[Any], RenderableType],
    *,
    as_json: bool,
    watching: bool,
    interval: float,
    count: int,
) -> None:
    from dagster_taskiq.operations.render import dumps, watch

    try:
        if as_json and watching:
            shown = 0
            while count == 0 or shown < count:
                if shown:
                    _sleep(interval)
                click.echo(dumps(produce(), indent=None))  # one document a line
                shown += 1
        elif as_json:
            click.echo(dumps(produce()))
        elif watching:
            watch(console, lambda: render(produce()), interval=interval, count=count)
        else:
            console.print(render(produce()))
    except KeyboardInterrupt:
        pass


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _watch_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--count",
        type=click.IntRange(0),
        default=0,
        help="With --watch: stop after this many refreshes (0: until Ctrl-C).",
    )(func)
    func = click.option(
        "--interval",
        type=click.FloatRange(0.2),
        default=2.0,
        show_default=True,
        help="Seconds between refreshes.",
    )(func)
    func = click.option(
        "--watch", "watching", is_flag=True, help="Refresh as a live view (Ctrl-C stops)."
    )(func)
    return click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")(func)


@click.command(epilog=WHERE)
@_watch_options
def status(as_json: bool, watching: bool, interval: float, count: int) -> None:
    """Queues, dead letters, workers, leases, rejections and runs in flight, per pool.

    Per queue: visible, delayed and in-flight messages and the age of the oldest one
    (CloudWatch's AWS/SQS ApproximateAgeOfOldestMessage on AWS; where it has no datapoint,
    and on the local stack, the oldest step in the ledger not yet taken by a worker: the
    output says which). Per pool: desired and running workers (ECS, or the local pool) and
    the scaler's last decision. From the ledger: rows by state, live leases, rejected
    messages in the last hour by reason, and each run in flight with its steps by state.
    """
    from dagster_taskiq.operations.render import render_status
    from dagster_taskiq.operations.status import collect_status

    with _deployment() as (target, ledger):
        _show(
            _console(),
            lambda: collect_status(target, ledger),
            render_status,
            as_json=as_json,
            watching=watching,
            interval=interval,
            count=count,
        )


@click.group(epilog=WHERE)
def runs() -> None:
    """Runs, step attempt by step attempt."""


@runs.command("show", epilog=WHERE)
@click.argument("run_id")
@_watch_options
def runs_show(run_id: str, as_json: bool, watching: bool, interval: float, count: int) -> None:
    """Every step attempt of RUN_ID: ledger state, worker, deliveries, fencing token, lease,
    duplicates suppressed, error and rejections, beside what Dagster's event log says.

    The event log needs the Dagster instance ($DAGSTER_HOME); without it the ledger part is
    shown and the event-log column says it is unavailable.
    """
    from dagster_taskiq.operations.render import render_run
    from dagster_taskiq.operations.runs import run_report

    with _deployment() as (target, ledger):
        _show(
            _console(),
            lambda: run_report(ledger, run_id, target.dagster_home),
            render_run,
            as_json=as_json,
            watching=watching,
            interval=interval,
            count=count,
        )


@click.group(epilog=WHERE)
def dlq() -> None:
    """The dead letters: list, show one, purge.

    Reading a message from SQS means receiving it: listing makes the dead letters invisible
    for a short while (--hold seconds) and gives them back at once when done. Meanwhile the
    DLQ processor cannot see them, and each one's receive count goes up by one.
    """


_hold_option = click.option(
    "--hold",
    type=click.IntRange(1, 43_200),
    default=30,
    show_default=True,
    help="Seconds the listed messages stay invisible at most (they are given back at once).",
)


@dlq.command("list", epilog=WHERE)
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
@click.option("--run", "run_id", help="Only the dead letters of this run.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="The most letters to receive.",
)
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="How far back to list the dead letters the DLQ processor has recorded (10m, 2h, 1d).",
)
@_hold_option
def dlq_list(as_json: bool, run_id: str | None, limit: int, since: str, hold: int) -> None:
    """The dead letters in the DLQs, each decoded and joined to its ledger row and the reason
    it was dead-lettered or rejected; then those the DLQ processor already consumed.

    Listing receives the messages with a visibility of --hold seconds and gives them back at
    once (visibility 0): they are briefly invisible, and nothing is consumed.
    """
    from datetime import UTC, datetime

    from dagster_taskiq.operations.dlq import peek_dead_letters, recorded_dead_letters, select
    from dagster_taskiq.operations.logs import parse_since
    from dagster_taskiq.operations.render import dumps, render_dlq_list

    since_seconds = _since_seconds(since, parse_since, datetime.now(UTC))
    with _deployment() as (target, ledger):
        listing = peek_dead_letters(target, ledger, hold_seconds=hold, limit=limit)
        listing.release()
        chosen, _ = select(listing, run_id=run_id)
        listing.held = chosen
        recorded = None
        if ledger is not None:
            try:
                in_queue = {view.idempotency_key for view in listing.views}
                recorded = [
                    view
                    for view in recorded_dead_letters(
                        ledger, since_seconds=since_seconds, run_id=run_id
                    )
                    if view.idempotency_key not in in_queue
                ]
            except Exception as e:  # the queue's letters are still worth showing
                listing.errors.append(f"ledger: {type(e).__name__}: {e}")
        if as_json:
            click.echo(
                dumps(
                    {
                        "in_queue": listing.views,
                        "recorded": recorded,
                        "hold_seconds": listing.hold_seconds,
                        "errors": listing.errors,
                    }
                )
            )
        else:
            _console().print(render_dlq_list(listing, recorded))


def _since_seconds(since: str, parse: Callable[..., Any], now: Any) -> float:
    try:
        return float((now - parse(since, now=now)).total_seconds())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e


@dlq.command("show", epilog=WHERE)
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
@_hold_option
def dlq_show(message_id: str, as_json: bool, hold: int) -> None:
    """One dead letter in full: decoded fields, ledger row, rejections, the body.

    Like list, it receives the DLQ's messages briefly (--hold) and gives them back at once.
    """
    from dagster_taskiq.operations.dlq import find_letter
    from dagster_taskiq.operations.render import dumps, render_letter

    with _deployment() as (target, ledger):
        view, errors = find_letter(target, ledger, message_id, hold_seconds=hold)
    for error in errors:
        click.echo(f"! {error}", err=True)
    if view is None:
        raise click.ClickException(f"No dead letter {message_id} in the DLQs or the ledger")
    if as_json:
        click.echo(dumps(view))
    else:
        _console().print(render_letter(view))


@dlq.command("purge", epilog=WHERE)
@click.option("--run", "run_id", help="Only the dead letters of this run.")
@click.option(
    "--message-id", "message_ids", multiple=True, help="Only this dead letter; repeatable."
)
@click.option("--yes", is_flag=True, help="Do not ask before deleting.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="The most letters to receive.",
)
@click.option(
    "--hold",
    type=click.IntRange(30, 43_200),
    default=300,
    show_default=True,
    help="Seconds the listed messages stay hidden while you decide.",
)
def dlq_purge(
    run_id: str | None, message_ids: tuple[str, ...], yes: bool, limit: int, hold: int
) -> None:
    """Delete dead letters: lists them, asks, then deletes exactly the ones listed.

    The listed messages stay invisible while the question is open (--hold seconds), so the
    ones deleted are the ones shown; letters that arrive meanwhile are not touched (no
    PurgeQueue). Messages not chosen (--run, --message-id) are given back at once.
    """
    from dagster_taskiq.operations.dlq import delete_listed, peek_dead_letters, select
    from dagster_taskiq.operations.render import render_dlq_list, render_purge

    console = _console()
    with _deployment() as (target, ledger):
        listing = peek_dead_letters(target, ledger, hold_seconds=hold, limit=limit)
        chosen, others = select(listing, run_id=run_id, message_ids=message_ids)
        listing.release(others)
        listing.held = chosen
        console.print(render_dlq_list(listing, None))
        if not chosen:
            click.echo("Nothing to purge.")
            return
        if not yes and not click.confirm(
            f"Delete these {len(chosen)} dead letter(s) for good?", default=False
        ):
            listing.release()
            click.echo("Nothing deleted; the messages were given back.")
            sys.exit(1)
        result = delete_listed(listing, chosen)
        console.print(render_purge(result))
        if result.errors:
            sys.exit(1)


@click.command(epilog=WHERE)
@click.argument("component", type=click.Choice(["worker", "scaler", "dlq-processor"]))
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option("--since", default="10m", show_default=True, help="10m, 2h, 1d, or an ISO time.")
@click.option("--run", "run_id", help="Only the lines that name this run.")
@click.option("--pool", help="Only this worker pool's workers or scaler.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.option("--poll", type=click.FloatRange(0.2), default=2.0, show_default=True)
def logs(  # noqa: PLR0917 (click passes every option as a parameter)
    component: str,
    follow: bool,
    since: str,
    run_id: str | None,
    pool: str | None,
    as_json: bool,
    poll: float,
) -> None:
    """COMPONENT's logs: CloudWatch Logs on AWS (the log groups of the stack's outputs, in
    $DAGSTER_TASKIQ_WORKER_LOG_GROUP, $DAGSTER_TASKIQ_SCALER_LOG_GROUP,
    $DAGSTER_TASKIQ_DLQ_PROCESSOR_LOG_GROUP), the local stack's log files locally."""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    from dagster_taskiq.core.errors import ConfigurationError
    from dagster_taskiq.operations.logs import (
        LogEvent,
        LogQuery,
        follow_logs,
        parse_since,
        read_logs,
    )

    try:
        start = parse_since(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e
    query = LogQuery(component=component, since=start, run_id=run_id, pool=pool)

    def emit(event: LogEvent) -> None:
        if as_json:
            click.echo(json.dumps(event.as_dict()))
        else:
            click.echo(f"{event.time} {event.source} {event.message}")

    with _deployment(need_queues=False) as (target, _):
        try:
            if follow:
                for event in follow_logs(target, query, stop=lambda: False, poll_seconds=poll):
                    emit(event)
            else:
                for event in read_logs(target, query):
                    emit(event)
        except KeyboardInterrupt:
            pass
        except ConfigurationError as e:
            raise click.ClickException(str(e)) from e
        except (ClientError, BotoCoreError) as e:
            raise click.ClickException(f"CloudWatch Logs: {e}") from e
