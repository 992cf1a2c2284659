"""The numbers refresh by themselves: a workflow step's materialization makes Dagster's
declarative automation request the ledger snapshot and every dbt model, once."""

from __future__ import annotations

from types import ModuleType

import dagster as dg

from assets.newsletter import ISSUE_WEEKS
from assets.newsletter.assets import APPROVAL_REQUEST
from tests.conftest import ISSUE


def test_a_workflow_run_triggers_one_refresh_of_the_snapshot_and_the_models(
    definitions_module: ModuleType,
) -> None:
    defs: dg.Definitions = definitions_module.defs
    repository = defs.get_repository_def()
    graph = repository.asset_graph
    targets = {
        key
        for key in graph.get_all_asset_keys()
        if key.path[0] in ("audit", "ledger", "metrics") and graph.get(key).is_materializable
    }
    assert {dg.AssetKey(["ledger", "approvals"]), dg.AssetKey(["metrics", "time_saved"])} <= targets
    [sensor] = [s for s in repository.sensor_defs if s.name == "metrics_automation"]
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    # The dbt tests are asset checks of the models they test.
    assert any(
        check.asset_key == dg.AssetKey(["metrics", "budget_burn"])
        for check in graph.asset_check_keys
    )

    with dg.instance_for_test() as instance:
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # nothing has been written yet

        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=APPROVAL_REQUEST, partition=ISSUE)
        )
        assert ISSUE in ISSUE_WEEKS.get_partition_keys(dynamic_partitions_store=instance)
        second = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=first.cursor
        )
        requested = {key for key in targets if second.get_num_requested(key) == 1}
        assert second.total_requested == len(targets)
        assert requested == targets

        quiet = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=second.cursor
        )
        assert quiet.total_requested == 0  # requested once, not on every evaluation
