"""Asset values as JSON files in the state directory, readable by the operator and by any run.

Work products are pydantic models; storing them as JSON (not pickles in DAGSTER_HOME) means a
publish run launched from the CLI, the sensor or another instance reads the same draft, and the
operator can open it in an editor.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, TypeAdapter

from aios_dagster.files import atomic_write


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores each asset partition as `<root>/<asset path>/<partition>.json`."""

    root: str

    def _path(self, context: dg.OutputContext | dg.InputContext) -> Path:
        asset_key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else "all"
        return Path(self.root).joinpath(*asset_key.path, f"{partition}.json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        """Write the value as JSON, atomically."""
        if obj is None:
            return
        if isinstance(obj, BaseModel):
            data = obj.model_dump_json(indent=2)
        else:
            data = json.dumps(obj, indent=2, default=str)
        path = self._path(context)
        atomic_write(path, data)
        context.add_output_metadata({"artifact": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        """Read the upstream value back into the type the step declares."""
        upstream = context.upstream_output
        assert upstream is not None
        path = self._path(context)
        if not path.exists():
            raise dg.Failure(
                f"{'/'.join(context.asset_key.path)} has no stored value at {path}: "
                "materialize it for this partition first"
            )
        wanted = context.dagster_type.typing_type
        raw = path.read_bytes()
        if isinstance(wanted, type) and issubclass(wanted, BaseModel):
            return wanted.model_validate_json(raw)
        return TypeAdapter(wanted).validate_json(raw) if wanted is not Any else json.loads(raw)
