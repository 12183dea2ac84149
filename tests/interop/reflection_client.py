#!/usr/bin/env python3
"""A client in another language, built from server reflection alone (no .proto
files): creates a class of 3, registers 5 users, enrolls them concurrently and
checks that exactly 3 succeed and 2 get RESOURCE_EXHAUSTED with reason
CLASS_FULL, then that grpc.health.v1 answers SERVING.

    make interop    # with `make run` going: installs grpcio, grpcio-reflection
                    # and grpcio-status into .run/venv, then runs this against
                    # 127.0.0.1:${ENROLLMENT_PORT:-50051}

or, with those packages in any Python environment:

    python3 tests/interop/reflection_client.py 127.0.0.1:50051

It speaks TLS with `make run`'s development CA (.run/dev/ca.pem, or $CA_FILE)
and calls as a provisioning service of organization acme, with the token
`make run` wrote (.run/dev/tokens/provisioning_service, or $TOKEN).
"""
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with open(os.environ.get("CA_FILE", ".run/dev/ca.pem"), "rb") as f:
    credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
token = os.environ.get("TOKEN") or open(".run/dev/tokens/provisioning_service").read().strip()
# Reflection and health need no token; every other call carries it.
channel = grpc.secure_channel(target, credentials)
metadata = [("authorization", f"Bearer {token}")]
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
service = pool.FindServiceByName("trainingkeys.v1.EnrollmentService")


def rpc(name):
    method = service.FindMethodByName(name)
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service.full_name}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    return lambda **fields: call(request(**fields), metadata=metadata)


def reason(error):
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


org = "acme"
run = uuid.uuid4().hex[:12]
Timestamp = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.protobuf.Timestamp"))
cls = rpc("CreateClass")(
    organization_id=org, title="Interop", course_id="PY-1",
    start_time=Timestamp(seconds=1_900_000_000), end_time=Timestamp(seconds=1_900_086_400),
    max_students=3, lab_access_days=0,
)
cls = getattr(cls, "class")
users = [rpc("RegisterUser")(organization_id=org, email=f"p{i}-{run}@example.com", display_name=f"P{i}").user for i in range(5)]


def enroll(user):
    try:
        rpc("Enroll")(class_id=cls.class_id, user_id=user.user_id)
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name} {reason(e)}"


with ThreadPoolExecutor(5) as ex:
    outcomes = sorted(ex.map(enroll, users))
print("outcomes:", outcomes)
assert outcomes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED CLASS_FULL", "RESOURCE_EXHAUSTED CLASS_FULL"], outcomes

health_pool = pool.FindServiceByName("grpc.health.v1.Health")
check = health_pool.FindMethodByName("Check")
req = message_factory.GetMessageClass(check.input_type)
resp = message_factory.GetMessageClass(check.output_type)
status = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=resp.FromString)(req(service=""))
print("health:", resp.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[status.status].name)
assert status.status == 1
print("interop check passed")
