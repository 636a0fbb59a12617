"""Validate custom resources offline against a CRD's ``openAPIV3Schema``, as strictly as the API server.

The CRD schema is OpenAPI v3 with Kubernetes extensions, not JSON Schema. The conversion:

- an object with ``properties`` and no ``additionalProperties`` gets ``additionalProperties: false``:
  the API server prunes unknown fields, and with ``kubectl``'s default strict field validation
  rejects them, so a misspelt field must fail here too (``x-kubernetes-preserve-unknown-fields``
  keeps an object open; neither CRD used here has one);
- ``x-kubernetes-int-or-string`` becomes ``anyOf: [integer, string]`` where controller-gen did not
  already write it (a ``pattern`` next to it then applies to the string form only, as in Kubernetes);
- ``nullable: true`` admits ``null``;
- ``format: int32``/``int64`` are range-checked (JSON Schema ignores unknown formats);
- ``x-kubernetes-list-type: map`` lists must have unique ``x-kubernetes-list-map-keys``, and ``set``
  lists unique items;
- ``metadata`` is only ``type: object`` in a CRD (the server checks ObjectMeta itself), so
  ``check_metadata`` checks the name and labels the way apimachinery does;
- CEL rules (``x-kubernetes-validations``) cannot run here; the two CRDs' rules only concern fields
  stalwart does not set (``managedBy``) or updates (``self == oldSelf``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_schema(crd_path: Path, version: str) -> dict[str, Any]:
    """The strict JSON Schema of ``version`` of the CRD in ``crd_path``."""
    crd = yaml.safe_load(crd_path.read_text())
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise KeyError(f"{crd_path.name} has versions {sorted(versions)}, not {version!r}")
    return _convert(copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"]))


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "default"):  # documentation and server-side defaulting
            continue
        if key == "properties":  # field names, which may be anything (even "description")
            converted[key] = {name: _convert(sub) for name, sub in value.items()}
        else:
            converted[key] = _convert(value)
    node = converted
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    return node


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Any:
    if not validator.is_type(instance, "array"):
        return
    seen: set[tuple] = set()
    for item in instance:
        key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else (repr(item),)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {item!r}")
        seen.add(key)


def _int_format(validator: Any, fmt: str, instance: Any, schema: dict) -> Any:
    bounds = _INT_RANGES.get(fmt)
    if bounds and validator.is_type(instance, "integer") and not bounds[0] <= instance <= bounds[1]:
        yield jsonschema.ValidationError(f"{instance} is out of range for {fmt}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-map-keys": _list_map_keys, "format": _int_format},
)


def errors(schema: dict[str, Any], instance: dict[str, Any]) -> list[str]:
    """Every violation as ``path: message`` (empty when valid)."""
    found = []
    for error in _Validator(schema).iter_errors(instance):
        path = ".".join(str(p) for p in error.absolute_path) or "<root>"
        found.append(f"{path}: {error.message}")
    return sorted(found)


def check_metadata(metadata: dict[str, Any], *, max_name: int = 63) -> list[str]:
    """ObjectMeta rules the CRD schema leaves to the server: a DNS-1035 name (the operators' webhooks
    ask for it) and valid label keys and values."""
    problems = []
    name = metadata.get("name", "")
    if not _DNS1035.match(name) or len(name) > max_name:
        problems.append(f"name {name!r} is not a DNS-1035 label of at most {max_name} characters")
    for key, value in (metadata.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (
            (prefix and not _DNS1123_SUBDOMAIN.match(prefix))
            or not _LABEL_NAME.match(label)
            or len(label) > 63
        ):
            problems.append(f"label key {key!r} is invalid")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"label value {value!r} of {key!r} is invalid")
    return problems
