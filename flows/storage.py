"""Storage credentials from Prefect blocks, as fsspec storage options.

`storage_block` names a saved block as "<block type slug>/<block name>":

- `aws-credentials/NAME`: prefect-aws's `AwsCredentials` (key, secret, session token, region,
  profile, and `aws_client_parameters.endpoint_url` for S3-compatible servers);
- `s3-bucket/NAME`: prefect-aws's `S3Bucket`, through its credentials;
- `secret/NAME`: a Prefect `Secret` whose value is the fsspec storage options themselves (a JSON
  object, e.g. {"key": ..., "secret": ..., "endpoint_url": ...}).

The secret values stay in `SecretStr` fields on the server and in memory here; they are not
parameters of the run, so they appear neither in its parameters nor in its logs.
"""

from __future__ import annotations

import json

KINDS = ("aws-credentials", "s3-bucket", "secret")


def storage_options(block_ref: str | None) -> dict:
    """fsspec storage options from the block `block_ref` ("slug/name"), or {} for None."""
    if not block_ref:
        return {}
    kind, _, name = block_ref.partition("/")
    if kind not in KINDS or not name:
        raise ValueError(f"storage_block {block_ref!r}: name a saved block as TYPE/NAME with TYPE one of "
                         f"{', '.join(KINDS)} (e.g. aws-credentials/archive)")
    from prefect.exceptions import ObjectNotFound
    try:
        if kind == "secret":
            from prefect.blocks.system import Secret
            return _secret_options(Secret.load(name).get(), block_ref)
        try:
            from prefect_aws import AwsCredentials, S3Bucket
        except ImportError:
            raise ValueError(f"storage_block {block_ref!r} needs prefect-aws: pip install prefect-aws") from None
        if kind == "s3-bucket":
            return aws_options(S3Bucket.load(name).credentials)
        return aws_options(AwsCredentials.load(name))
    except (ObjectNotFound, ValueError) as e:
        if isinstance(e, ValueError) and "Unable to find block document" not in str(e):
            raise
        raise ValueError(f"storage_block {block_ref!r}: no {kind} block named {name!r} on this Prefect server") from None


def aws_options(credentials) -> dict:
    """s3fs options from prefect-aws credentials (AwsCredentials, or MinIOCredentials of an S3Bucket)."""
    def secret(value):
        return value.get_secret_value() if hasattr(value, "get_secret_value") else value

    options: dict = {}
    pairs = {"key": getattr(credentials, "aws_access_key_id", None) or getattr(credentials, "minio_root_user", None),
             "secret": secret(getattr(credentials, "aws_secret_access_key", None)
                              or getattr(credentials, "minio_root_password", None)),
             "token": secret(getattr(credentials, "aws_session_token", None)),
             "profile": getattr(credentials, "profile_name", None)}
    options.update({k: v for k, v in pairs.items() if v})
    region = getattr(credentials, "region_name", None)
    if region:
        options["client_kwargs"] = {"region_name": region}
    params = getattr(credentials, "aws_client_parameters", None)
    endpoint = getattr(params, "endpoint_url", None) if params is not None else None
    if endpoint:
        options["endpoint_url"] = str(endpoint)
    if params is not None and getattr(params, "verify", True) is False:
        options.setdefault("client_kwargs", {})["verify"] = False
    return options


def _secret_options(value, block_ref: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise ValueError(f"storage_block {block_ref!r}: the secret must hold fsspec storage options as a JSON object")
    return dict(value)
