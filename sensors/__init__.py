"""Triggers and watchmen: the schedules and sensors that start workflow runs, and the sensor
that settles side effects a killed run left in flight."""

from sensors.approvals import approved_actions_sensor
from sensors.failures import failed_steps_sensor
from sensors.inbound import customer_messages_sensor
from sensors.reconciler import stuck_effects_sensor
from sensors.schedules import weekly_issue_schedule

__all__ = [
    "approved_actions_sensor",
    "customer_messages_sensor",
    "failed_steps_sensor",
    "stuck_effects_sensor",
    "weekly_issue_schedule",
]
