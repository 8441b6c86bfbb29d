"""The dashboard and the alarms; alarms notify the alert topic."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from .environment import METRICS_NAMESPACE_VALUE as NAMESPACE
from .settings import DeploymentSettings
from .workers import Workers

ONE_MINUTE = Duration.minutes(1)
FIVE_MINUTES = Duration.minutes(5)
# Container Insights' namespace for ECS services.
CONTAINER_INSIGHTS = "ECS/ContainerInsights"
# A dead letter is processed within seconds; one still on the DLQ this long is not being.
DEAD_LETTERS_STUCK_PERIODS = 3


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        queue: sqs.IQueue,
        dead_letter_queue: sqs.IQueue,
        workers: Workers,
        scaler: lambda_.IFunction,
        dead_letter_processor: lambda_.IFunction,
        topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        # The scaler's metrics carry service=<cluster>/<service> (EcsWorkerService.name); the
        # workers' and the DLQ processor's carry the deployment's POWERTOOLS_SERVICE_NAME.
        worker_service = f"{workers.cluster.cluster_name}/{workers.service.service_name}"
        scaler_dimensions = {"service": worker_service}
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

        def tasks(name: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=CONTAINER_INSIGHTS,
                metric_name=name,
                dimensions_map={
                    "ClusterName": workers.cluster.cluster_name,
                    "ServiceName": workers.service.service_name,
                },
                statistic="Average",
                period=ONE_MINUTE,
                label=label,
            )

        waiting = queue.metric_approximate_number_of_messages_visible(
            statistic="Maximum", period=ONE_MINUTE, label="waiting (visible)"
        )
        in_flight = queue.metric_approximate_number_of_messages_not_visible(
            statistic="Maximum", period=ONE_MINUTE, label="running (in flight)"
        )
        oldest = queue.metric_approximate_age_of_oldest_message(
            statistic="Maximum", period=ONE_MINUTE, label="oldest waiting step (s)"
        )
        dead_letters_visible = dead_letter_queue.metric_approximate_number_of_messages_visible(
            statistic="Maximum", period=FIVE_MINUTES, label="dead letters waiting"
        )
        dead_letters_in_flight = (
            dead_letter_queue.metric_approximate_number_of_messages_not_visible(
                statistic="Maximum", period=FIVE_MINUTES, label="dead letters being processed"
            )
        )
        desired_workers = cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name="DesiredWorkers",
            dimensions_map=scaler_dimensions,
            statistic="Maximum",
            period=ONE_MINUTE,
            label="scaler's decision",
        )
        scaler_errors = cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name="ScalerErrors",
            dimensions_map=scaler_dimensions,
            statistic="Sum",
            period=FIVE_MINUTES,
            label="scaler input errors",
        )
        scaling_decisions = cloudwatch.MathExpression(
            expression=(
                f'SEARCH(\'{{{NAMESPACE},reason,service}} MetricName="ScalingDecisions" '
                f"service=\"{worker_service}\"', 'Sum', 60)"
            ),
            using_metrics={},
            label="decisions by reason",
            period=ONE_MINUTE,
        )

        self.dead_letters_alarm = cloudwatch.Alarm(
            self,
            "DeadLettersNotDrained",
            alarm_description=(
                "The dead-letter queue has held messages for 15 minutes. The DLQ processor "
                "normally takes each dead letter within seconds (and alerts for it): it is "
                "failing or disabled. Its logs say why; the steps are not marked failed yet."
            ),
            metric=cloudwatch.MathExpression(
                expression="FILL(visible, 0) + FILL(inflight, 0)",
                using_metrics={"visible": dead_letters_visible, "inflight": dead_letters_in_flight},
                label="dead letters on the DLQ",
                period=FIVE_MINUTES,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=DEAD_LETTERS_STUCK_PERIODS,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.oldest_step_alarm = cloudwatch.Alarm(
            self,
            "StepsWaitingTooLong",
            alarm_description=(
                f"A step has waited over {settings.oldest_message_alarm_seconds} s for a "
                "worker: the workers are not starting (image, capacity, max_workers) or the "
                "scaler is not scaling out."
            ),
            metric=queue.metric_approximate_age_of_oldest_message(
                statistic="Maximum", period=FIVE_MINUTES
            ),
            threshold=settings.oldest_message_alarm_seconds,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.scaler_alarm = cloudwatch.Alarm(
            self,
            "ScalerFailing",
            alarm_description=(
                "The scaler Lambda failed, or could not read the queue, the ledger or the "
                "service: the worker count is not following the queue."
            ),
            metric=cloudwatch.MathExpression(
                expression="FILL(invocation_errors, 0) + FILL(input_errors, 0)",
                using_metrics={
                    "invocation_errors": scaler.metric_errors(statistic="Sum", period=FIVE_MINUTES),
                    "input_errors": scaler_errors,
                },
                label="scaler errors",
                period=FIVE_MINUTES,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.alarms = [self.dead_letters_alarm, self.oldest_step_alarm, self.scaler_alarm]
        for alarm in self.alarms:
            alarm.add_alarm_action(actions.SnsAction(topic))
            alarm.add_ok_action(actions.SnsAction(topic))

        def lambda_metrics(kind: str) -> list[cloudwatch.IMetric]:
            functions = {"scaler": scaler, "DLQ processor": dead_letter_processor}
            if kind == "errors":
                return [
                    fn.metric_errors(statistic="Sum", period=FIVE_MINUTES, label=name)
                    for name, fn in functions.items()
                ]
            return [
                fn.metric_duration(statistic="Maximum", period=FIVE_MINUTES, label=name)
                for name, fn in functions.items()
            ]

        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=settings.stack_name,
            default_interval=Duration.hours(3),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Step queue",
                left=[waiting, in_flight],
                right=[oldest],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Workers: desired vs running",
                left=[
                    tasks("DesiredTaskCount", "desired tasks"),
                    tasks("RunningTaskCount", "running tasks"),
                    desired_workers,
                ],
                width=12,
            ),
        )
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
                    dead_letters_visible,
                ],
                width=12,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Scaling decisions", left=[scaling_decisions], width=8),
            cloudwatch.GraphWidget(
                title="Lambda errors", left=[*lambda_metrics("errors"), scaler_errors], width=8
            ),
            cloudwatch.GraphWidget(
                title="Lambda duration", left=lambda_metrics("duration"), width=8
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24),
        )
