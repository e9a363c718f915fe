"""Server reflection answers on grpc.reflection.v1 (what grpcurl, Postman and grpcui ask
for first) and on v1alpha, with or without an API key, on a real gateway, through Envoy
and on the scheduler.

The v1 client here is built from the canonical v1 proto (compiled with grpc_tools'
protoc into a private pool), not from the server's own code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor_database import DescriptorDatabase
from grpc_tools import protoc

from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS, start_cluster

# grpc-proto's grpc/reflection/v1/reflection.proto, its comments left out.
V1_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest {
  string containing_type = 1;
  int32 extension_number = 2;
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse {
  string base_type_name = 1;
  repeated int32 extension_number = 2;
}
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""

API = "cutout.v1.CutoutService"
HEADERS: dict[str, tuple[tuple[str, str], ...]] = {
    "no-key": (),
    "key": (("authorization", f"Bearer {KEYS['vendor-a']}"),),
    "wrong-key": (("authorization", "Bearer ck_not-a-key"),),
}


class Reflection:
    """A reflection client of one version, speaking through message classes of that version."""

    def __init__(self, package: str, pool: descriptor_pool.DescriptorPool) -> None:
        self.package = package
        self.request = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.ServerReflectionRequest")
        )
        self.response = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.ServerReflectionResponse")
        )

    def ask(
        self,
        address: str,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float = 5,
        **request: str,
    ) -> Any:
        """One request, its stream kept open until the answer comes, as grpcurl's is."""
        answered = threading.Event()

        def requests() -> Iterator[Any]:
            yield self.request(**request)
            answered.wait(timeout_s)

        with grpc.insecure_channel(address) as channel:
            call = channel.stream_stream(
                f"/{self.package}.ServerReflection/ServerReflectionInfo",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=self.response.FromString,
            )
            try:
                reply = next(iter(call(requests(), metadata=metadata, timeout=timeout_s)))
            finally:
                answered.set()
        assert not reply.HasField("error_response"), reply.error_response
        return reply

    def services(self, address: str, metadata: tuple[tuple[str, str], ...]) -> set[str]:
        reply = self.ask(address, metadata, list_services="*")
        return {s.name for s in reply.list_services_response.service}

    def files(
        self, address: str, metadata: tuple[tuple[str, str], ...], symbol: str
    ) -> descriptor_pool.DescriptorPool:
        """A fresh pool holding the file that defines `symbol` and its dependencies."""
        reply = self.ask(address, metadata, file_containing_symbol=symbol)
        database = DescriptorDatabase()
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            database.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
        return descriptor_pool.DescriptorPool(database)


@pytest.fixture(scope="module")
def upstream_v1(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    folder = tmp_path_factory.mktemp("reflection-v1")
    (folder / "reflection.proto").write_text(V1_PROTO)
    out = folder / "v1.binpb"
    assert (
        protoc.main(["protoc", f"-I{folder}", f"--descriptor_set_out={out}", "reflection.proto"])
        == 0
    )
    [file] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


@pytest.fixture(scope="module")
def clients(upstream_v1: descriptor_pb2.FileDescriptorProto) -> dict[str, Reflection]:
    from grpc_reflection.v1alpha import reflection_pb2  # v1alpha: the library's own

    v1_pool = descriptor_pool.DescriptorPool()
    v1_pool.Add(upstream_v1)
    v1alpha_pool = descriptor_pool.DescriptorPool()
    v1alpha_file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1alpha_file)
    v1alpha_pool.Add(v1alpha_file)
    return {
        "v1": Reflection("grpc.reflection.v1", v1_pool),
        "v1alpha": Reflection("grpc.reflection.v1alpha", v1alpha_pool),
    }


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    """Envoy in front of a gateway, and a scheduler; no node (reflection needs none)."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("reflection"), tiny_model_dir, start_nodes=False, envoy=True
    )
    yield cluster
    cluster.stop()


def address(cluster: LocalCluster, target: str) -> str:
    if target == "envoy":
        return cluster.public_address
    service = cluster.scheduler if target == "scheduler" else cluster.gateway
    assert service is not None
    return service.address


def check_public_api(client: Reflection, at: str, metadata: tuple[tuple[str, str], ...]) -> None:
    """`grpcurl list` shows the API and both reflections; `describe` resolves the API."""
    listed = client.services(at, metadata)
    assert {
        API,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed, listed
    service = client.files(at, metadata, API).FindServiceByName(API)
    methods = {m.name for m in service.methods}
    assert {"SubmitJob", "GetJob", "WatchJob", "GetResult"} <= methods, methods
    submit = service.methods_by_name["SubmitJob"]
    assert submit.input_type.full_name == "cutout.v1.SubmitJobRequest"
    assert submit.input_type.fields  # the request's message resolved, with its fields


@pytest.mark.parametrize("header", list(HEADERS))
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_the_gateway_lists_and_describes_the_api_with_or_without_a_key(
    front: LocalCluster, clients: dict[str, Reflection], version: str, header: str
) -> None:
    check_public_api(clients[version], address(front, "gateway"), HEADERS[header])


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_envoy_passes_reflection_through_as_grpcurl_speaks_it(
    front: LocalCluster, clients: dict[str, Reflection], version: str
) -> None:
    check_public_api(clients[version], address(front, "envoy"), HEADERS["key"])


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_the_scheduler_answers_reflection_without_the_internal_token(
    front: LocalCluster, clients: dict[str, Reflection], version: str
) -> None:
    at = address(front, "scheduler")
    listed = clients[version].services(at, ())
    assert "cutout.internal.v1.SchedulerService" in listed, listed
    pool = clients[version].files(at, (), "cutout.internal.v1.SchedulerService")
    assert pool.FindServiceByName("cutout.internal.v1.SchedulerService").methods


def test_v1_describes_itself_as_the_canonical_v1_proto(
    front: LocalCluster,
    clients: dict[str, Reflection],
    upstream_v1: descriptor_pb2.FileDescriptorProto,
) -> None:
    """`grpcurl describe grpc.reflection.v1.ServerReflection` gets v1's real layout."""
    name = "grpc.reflection.v1.ServerReflection"
    served = clients["v1"].files(front.gateway_address, (), name).FindServiceByName(name).file
    served_proto = descriptor_pb2.FileDescriptorProto()
    served.CopyToProto(served_proto)
    assert served_proto.package == upstream_v1.package

    def layout(file: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
        messages = {
            m.name: sorted((f.name, f.number, f.type, f.label, f.type_name) for f in m.field)
            for m in file.message_type
        }
        methods = {
            (s.name, m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for s in file.service
            for m in s.method
        }
        return {"messages": messages, "methods": methods}

    assert layout(served_proto) == layout(upstream_v1)
