"""The CRD files the e2e suite installs are well-formed, checked without a cluster.

Not marked e2e: it runs in the default suite, so a broken file is caught before anyone
points the suite at a cluster.
"""

from __future__ import annotations

from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

from tests.e2e import cluster
from tests.e2e.cluster import MANAGED_BY

EXPECTED = {
    # name: (kind, scope, storage version)
    "inferenceservices.serving.kserve.io": ("InferenceService", "Namespaced", "v1beta1"),
    "servingruntimes.serving.kserve.io": ("ServingRuntime", "Namespaced", "v1alpha1"),
    "clusterservingruntimes.serving.kserve.io": (
        "ClusterServingRuntime",
        "Cluster",
        "v1alpha1",
    ),
    "services.serving.knative.dev": ("Service", "Namespaced", "v1"),
}


def _name(crd: CustomResourceDefinition) -> str:
    assert crd.metadata is not None and crd.metadata.name is not None
    return crd.metadata.name


def test_one_crd_per_file_for_each_kind_the_suite_creates() -> None:
    crds = cluster.load_crds()
    assert sorted(_name(crd) for crd in crds) == sorted(EXPECTED)
    assert [path.stem for path in cluster.crd_files()] == sorted(EXPECTED)


def test_crds_are_valid_as_the_api_server_checks_them() -> None:
    for crd in cluster.load_crds():
        name = _name(crd)
        kind, scope, version = EXPECTED[name]
        spec = crd.spec
        # The API server requires metadata.name == <plural>.<group>.
        assert name == f"{spec.names.plural}.{spec.group}"
        assert (spec.names.kind, spec.scope) == (kind, scope)
        assert spec.names.listKind == f"{kind}List"
        assert spec.names.singular == spec.names.plural.removesuffix("s")
        [served] = spec.versions
        assert (served.name, served.served, served.storage) == (version, True, True)
        # A structural schema: a type at the root and on each property, and unknown fields
        # kept only under spec and status (so metadata is still pruned and validated).
        assert served.schema is not None and served.schema.openAPIV3Schema is not None
        schema = served.schema.openAPIV3Schema
        assert schema.type == "object" and schema.properties is not None
        # lightkube keeps nested schemas as the raw JSON mappings.
        properties: dict[str, dict[str, object]] = schema.properties
        assert all(prop.get("type") for prop in properties.values())
        kept = {
            key
            for key, prop in properties.items()
            if prop.get("x-kubernetes-preserve-unknown-fields") is True
        }
        assert kept == {"spec", "status"}
        assert served.subresources is not None and served.subresources.status is not None
        # Marked so an interrupted run's CRDs are recognised and deleted by the next one.
        assert crd.metadata is not None and crd.metadata.labels == MANAGED_BY


def test_object_builders_match_the_crds() -> None:
    """Each test object's apiVersion and kind is served by one of the CRD files."""
    served = {
        (f"{crd.spec.group}/{crd.spec.versions[0].name}", crd.spec.names.kind): crd.spec.scope
        for crd in cluster.load_crds()
    }
    namespaced = [
        cluster.inference_service("a", "x:1", "ns"),
        cluster.serving_runtime("a", "x:1", "ns"),
        cluster.knative_service("a", "x:1", "ns"),
    ]
    for document in namespaced:
        assert served[(document["apiVersion"], document["kind"])] == "Namespaced"
    csr = cluster.cluster_serving_runtime("a", "x:1")
    assert served[(csr["apiVersion"], csr["kind"])] == "Cluster"
    assert "namespace" not in csr["metadata"]
