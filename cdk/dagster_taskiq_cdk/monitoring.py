"""The dashboard and the alarms, per worker pool; alarms notify the alert topic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from .environment import METRICS_NAMESPACE_VALUE as NAMESPACE
from .queue import StepQueues
from .settings import DEFAULT_POOL, DeploymentSettings, WorkerPool

ONE_MINUTE = Duration.minutes(1)
FIVE_MINUTES = Duration.minutes(5)
# Container Insights' namespace for ECS services.
CONTAINER_INSIGHTS = "ECS/ContainerInsights"
# A dead letter is processed within seconds; one still on the DLQ this long is not being.
DEAD_LETTERS_STUCK_PERIODS = 3


@dataclass(frozen=True)
class MonitoredPool:
    """What the dashboard and the alarms watch of one worker pool."""

    queues: StepQueues
    service: ecs.FargateService
    scaler: lambda_.IFunction

    @property
    def pool(self) -> WorkerPool:
        return self.queues.pool


@dataclass(frozen=True)
class PoolAlarms:
    dead_letters: cloudwatch.Alarm
    oldest_step: cloudwatch.Alarm
    oldest_priority_step: cloudwatch.Alarm | None
    scaler: cloudwatch.Alarm
    at_max_workers: cloudwatch.Alarm

    @property
    def all(self) -> list[cloudwatch.Alarm]:
        alarms = [
            self.dead_letters,
            self.oldest_step,
            self.oldest_priority_step,
            self.scaler,
            self.at_max_workers,
        ]
        return [alarm for alarm in alarms if alarm is not None]


class Monitoring(Construct):
    """Per pool: its queues (lane included), its workers, its DLQ, and four or five alarms
    (dead letters not drained, steps waiting too long on each queue, scaler failing, held at
    max_workers). Across pools: the step metrics, the Lambdas, and the alarms' status.

    The default pool's alarms keep the ids they had before there were pools; another pool's
    are prefixed with its PascalCase name (``HighMemStepsWaitingTooLong``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        cluster: ecs.ICluster,
        pools: Sequence[MonitoredPool],
        dead_letter_processor: lambda_.IFunction,
        topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        self._settings = settings
        self._cluster = cluster
        self._several = len(pools) > 1
        step_dimensions = {"service": settings.metrics_service}

        def step_metric(name: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=NAMESPACE,
                metric_name=name,
                dimensions_map=step_dimensions,
                statistic="Sum",
                period=ONE_MINUTE,
                label=label,
            )

        self.pool_alarms = {p.pool.name: self._alarms(p) for p in pools}
        default = self.pool_alarms[DEFAULT_POOL]
        self.dead_letters_alarm = default.dead_letters
        self.oldest_step_alarm = default.oldest_step
        self.scaler_alarm = default.scaler
        self.alarms = [alarm for alarms in self.pool_alarms.values() for alarm in alarms.all]
        for alarm in self.alarms:
            alarm.add_alarm_action(actions.SnsAction(topic))
            alarm.add_ok_action(actions.SnsAction(topic))

        functions = {self._label("scaler", p.pool): p.scaler for p in pools}
        functions["DLQ processor"] = dead_letter_processor

        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=settings.stack_name,
            default_interval=Duration.hours(3),
        )
        for monitored in pools:
            self.dashboard.add_widgets(*self._pool_widgets(monitored))
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Steps",
                left=[
                    step_metric("StepsStarted", "started"),
                    step_metric("StepsSucceeded", "succeeded"),
                    step_metric("StepsFailed", "failed"),
                ],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Faults",
                left=[
                    step_metric("StepsDeadLettered", "dead-lettered"),
                    step_metric("DuplicatesSuppressed", "duplicates suppressed"),
                    step_metric("LeasesLost", "leases lost"),
                    *(
                        self._dead_letters_visible(p.queues.dead_letter_queue, p.pool)
                        for p in pools
                    ),
                ],
                width=12,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Scaling decisions",
                left=[self._scaling_decisions(p) for p in pools],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Lambda errors",
                left=[
                    *(
                        fn.metric_errors(statistic="Sum", period=FIVE_MINUTES, label=name)
                        for name, fn in functions.items()
                    ),
                    *(self._scaler_errors(p) for p in pools),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Lambda duration",
                left=[
                    fn.metric_duration(statistic="Maximum", period=FIVE_MINUTES, label=name)
                    for name, fn in functions.items()
                ],
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24),
        )

    # -- per pool ----------------------------------------------------------------------------

    def _label(self, text: str, pool: WorkerPool) -> str:
        """A metric's label or a widget's title, naming the pool when there are several."""
        return f"{text} ({pool.name})" if self._several else text

    def _worker_service(self, monitored: MonitoredPool) -> str:
        """The scaler's metrics carry service=<cluster>/<service> (EcsWorkerService.name)."""
        return f"{self._cluster.cluster_name}/{monitored.service.service_name}"

    def _scaler_errors(self, monitored: MonitoredPool) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name="ScalerErrors",
            dimensions_map={"service": self._worker_service(monitored)},
            statistic="Sum",
            period=FIVE_MINUTES,
            label=self._label("scaler input errors", monitored.pool),
        )

    def _scaling_decisions(self, monitored: MonitoredPool) -> cloudwatch.MathExpression:
        return cloudwatch.MathExpression(
            expression=(
                f'SEARCH(\'{{{NAMESPACE},reason,service}} MetricName="ScalingDecisions" '
                f"service=\"{self._worker_service(monitored)}\"', 'Sum', 60)"
            ),
            using_metrics={},
            label=self._label("decisions by reason", monitored.pool),
            period=ONE_MINUTE,
        )

    def _at_max_workers(
        self, monitored: MonitoredPool, period: Duration, *, label: bool = True
    ) -> cloudwatch.Metric:
        """The share of the scaler's evaluations that left the pool at max_workers."""
        return cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name="AtMaxWorkers",
            dimensions_map={"service": self._worker_service(monitored)},
            statistic="Average",
            period=period,
            label=self._label("at max_workers (share of evaluations)", monitored.pool)
            if label
            else None,
        )

    def _dead_letters_visible(self, queue: sqs.IQueue, pool: WorkerPool) -> cloudwatch.Metric:
        return queue.metric_approximate_number_of_messages_visible(
            statistic="Maximum",
            period=FIVE_MINUTES,
            label=self._label("dead letters waiting", pool),
        )

    def _alarms(self, monitored: MonitoredPool) -> PoolAlarms:
        pool, queues = monitored.pool, monitored.queues
        of_pool = "" if pool.is_default else f"Pool {pool.name}: "
        dead_letter_queue = queues.dead_letter_queue
        dead_letters = cloudwatch.Alarm(
            self,
            pool.prefixed("DeadLettersNotDrained"),
            alarm_description=(
                f"{of_pool}The dead-letter queue has held messages for 15 minutes. The DLQ "
                "processor normally takes each dead letter within seconds (and alerts for it): "
                "it is failing or disabled. Its logs say why; the steps are not marked failed yet."
            ),
            metric=cloudwatch.MathExpression(
                expression="FILL(visible, 0) + FILL(inflight, 0)",
                using_metrics={
                    "visible": self._dead_letters_visible(dead_letter_queue, pool),
                    "inflight": dead_letter_queue.metric_approximate_number_of_messages_not_visible(
                        statistic="Maximum",
                        period=FIVE_MINUTES,
                        label="dead letters being processed",
                    ),
                },
                label="dead letters on the DLQ",
                period=FIVE_MINUTES,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=DEAD_LETTERS_STUCK_PERIODS,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )

        def waiting_too_long(queue: sqs.IQueue, name: str, what: str) -> cloudwatch.Alarm:
            return cloudwatch.Alarm(
                self,
                pool.prefixed(name),
                alarm_description=(
                    f"{of_pool}A {what} has waited over "
                    f"{self._settings.oldest_message_alarm_seconds} s for a worker: the workers "
                    "are not starting (image, capacity, max_workers) or the scaler is not "
                    "scaling out."
                ),
                metric=queue.metric_approximate_age_of_oldest_message(
                    statistic="Maximum", period=FIVE_MINUTES
                ),
                threshold=self._settings.oldest_message_alarm_seconds,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                evaluation_periods=1,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )

        oldest_step = waiting_too_long(queues.queue, "StepsWaitingTooLong", "step")
        oldest_priority_step = (
            None
            if queues.priority_queue is None
            else waiting_too_long(
                queues.priority_queue, "PriorityStepsWaitingTooLong", "high-priority step"
            )
        )
        scaler = cloudwatch.Alarm(
            self,
            pool.prefixed("ScalerFailing"),
            alarm_description=(
                f"{of_pool}The scaler Lambda failed, or could not read the queue, the ledger or "
                "the service: the worker count is not following the queue."
            ),
            metric=cloudwatch.MathExpression(
                expression="FILL(invocation_errors, 0) + FILL(input_errors, 0)",
                using_metrics={
                    "invocation_errors": monitored.scaler.metric_errors(
                        statistic="Sum", period=FIVE_MINUTES
                    ),
                    "input_errors": self._scaler_errors(monitored),
                },
                label="scaler errors",
                period=FIVE_MINUTES,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        minutes = self._settings.max_workers_alarm_minutes
        at_max_workers = cloudwatch.Alarm(
            self,
            pool.prefixed("HeldAtMaxWorkers"),
            alarm_description=(
                f"{of_pool}The scaler has held the pool at max_workers ({pool.max_workers}) for "
                f"{minutes} minutes: steps wait behind the cap, not for workers to start. If "
                "their wait matters, raise max_workers; `dagster-taskiq scaling simulate` on "
                "the ledger's history shows what a higher cap buys."
            ),
            metric=self._at_max_workers(monitored, FIVE_MINUTES, label=False),
            # Nearly every evaluation of each five minutes: one evaluation below the cap is
            # not a reason to reset the count.
            threshold=0.9,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=minutes // 5,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        return PoolAlarms(
            dead_letters=dead_letters,
            oldest_step=oldest_step,
            oldest_priority_step=oldest_priority_step,
            scaler=scaler,
            at_max_workers=at_max_workers,
        )

    def _pool_widgets(self, monitored: MonitoredPool) -> list[cloudwatch.IWidget]:
        """One row: the pool's queues, its workers, its dead letters."""
        pool, queues = monitored.pool, monitored.queues
        left: list[cloudwatch.IMetric] = []
        right: list[cloudwatch.IMetric] = []
        for queue, lane in ((queues.queue, ""), (queues.priority_queue, "lane ")):
            if queue is None:
                continue
            left += [
                queue.metric_approximate_number_of_messages_visible(
                    statistic="Maximum", period=ONE_MINUTE, label=f"{lane}waiting (visible)"
                ),
                queue.metric_approximate_number_of_messages_not_visible(
                    statistic="Maximum", period=ONE_MINUTE, label=f"{lane}running (in flight)"
                ),
            ]
            right.append(
                queue.metric_approximate_age_of_oldest_message(
                    statistic="Maximum", period=ONE_MINUTE, label=f"{lane}oldest waiting step (s)"
                )
            )

        def tasks(name: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=CONTAINER_INSIGHTS,
                metric_name=name,
                dimensions_map={
                    "ClusterName": self._cluster.cluster_name,
                    "ServiceName": monitored.service.service_name,
                },
                statistic="Average",
                period=ONE_MINUTE,
                label=label,
            )

        desired_workers = cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name="DesiredWorkers",
            dimensions_map={"service": self._worker_service(monitored)},
            statistic="Maximum",
            period=ONE_MINUTE,
            label="scaler's decision",
        )
        dead_letter_queue = queues.dead_letter_queue
        return [
            cloudwatch.GraphWidget(
                title=self._label("Step queue", pool), left=left, right=right, width=8
            ),
            cloudwatch.GraphWidget(
                title=self._label("Workers: desired vs running", pool),
                left=[
                    tasks("DesiredTaskCount", "desired tasks"),
                    tasks("RunningTaskCount", "running tasks"),
                    desired_workers,
                ],
                right=[self._at_max_workers(monitored, ONE_MINUTE)],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title=self._label("Dead letters", pool),
                left=[
                    dead_letter_queue.metric_approximate_number_of_messages_visible(
                        statistic="Maximum", period=ONE_MINUTE, label="waiting"
                    ),
                    dead_letter_queue.metric_approximate_number_of_messages_not_visible(
                        statistic="Maximum", period=ONE_MINUTE, label="being processed"
                    ),
                ],
                width=8,
            ),
        ]
