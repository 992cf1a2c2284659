"""Triggers and watchmen: the schedules and sensors that start workflow runs, and the sensor
that settles side effects a killed run left in flight."""

from sensors.approvals import approved_actions_sensor
from sensors.deadlines import approval_deadlines_sensor
from sensors.failures import failed_steps_sensor
from sensors.inbound import customer_messages_sensor
from sensors.reconciler import stuck_effects_sensor
from sensors.releases import release_tags_sensor
from sensors.schedules import weekly_issue_schedule
from sensors.sla import customer_sla_sensor
from sensors.telemetry import telemetry_anomalies_sensor

__all__ = [
    "approval_deadlines_sensor",
    "approved_actions_sensor",
    "customer_messages_sensor",
    "customer_sla_sensor",
    "failed_steps_sensor",
    "release_tags_sensor",
    "stuck_effects_sensor",
    "telemetry_anomalies_sensor",
    "weekly_issue_schedule",
]
