"""Server reflection on both grpc.reflection.v1 and grpc.reflection.v1alpha.

grpcio-reflection ships only v1alpha's servicer (grpc/grpc#38576), while current
grpcurl, Postman and grpcui ask for v1 first. v1's proto is v1alpha's with another
package name: the same messages with the same field numbers, so the same bytes on
the wire. So the library's servicer answers both: on v1 its requests and responses
are read and written with v1alpha's message classes, and v1's file descriptor,
made from v1alpha's with the package renamed, is added to the descriptor pool so
that `describe grpc.reflection.v1.ServerReflection` resolves too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"  # its name in grpc-proto
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
METHOD = "ServerReflectionInfo"


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, from v1alpha's descriptor with the package renamed."""
    v1alpha = reflection_pb2.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.CopyToProto(proto)
    old, new = f".{v1alpha.package}.", f".{V1_PACKAGE}."
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name.startswith(old):
                fld.type_name = new + fld.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    return proto


def _add_v1_to_pool(pool: descriptor_pool.DescriptorPool) -> None:
    """Once per process (and never where something else already defined v1)."""
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_server_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection on v1 and v1alpha, listing `service_names` and both reflections."""
    _add_v1_to_pool(descriptor_pool.Default())
    names = [*service_names, *SERVICE_NAMES]
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # v1alpha
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            # v1's messages on the wire are v1alpha's: same fields, same numbers.
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),)
    )
