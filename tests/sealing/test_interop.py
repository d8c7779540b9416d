"""Interop: Parquet encrypted by another PME writer (here pyarrow's CryptoFactory in a separate process, external
key material as parquet-mr writes it) is readable once a KMS client for its master keys is configured."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from medtee.sealing.manifest import SealedDataError
from medtee.sealing.reader import read_pme_table

# An independent KMS: RFC 3394 AES key wrap (not medtee's AES-GCM wrapping), keys handed over out of band.
KMS_SOURCE = textwrap.dedent('''
    import base64
    import pyarrow.parquet.encryption as pe
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

    class VaultLikeKms(pe.KmsClient):
        def __init__(self, master_keys):
            super().__init__()
            self.master_keys = master_keys

        def wrap_key(self, key_bytes, master_key_identifier):
            return base64.b64encode(aes_key_wrap(self.master_keys[master_key_identifier], key_bytes))

        def unwrap_key(self, wrapped_key, master_key_identifier):
            return aes_key_unwrap(self.master_keys[master_key_identifier], base64.b64decode(wrapped_key))
''')

MASTER_KEYS = {"footer-k": bytes(range(32)), "col-k": bytes(range(32, 64))}

WRITER = KMS_SOURCE + textwrap.dedent('''
    import sys
    import pyarrow as pa
    import pyarrow.parquet as pq
    path, internal = sys.argv[1], sys.argv[2] == "internal"
    keys = {"footer-k": bytes(range(32)), "col-k": bytes(range(32, 64))}
    factory = pe.CryptoFactory(lambda cfg: VaultLikeKms(keys))
    config = pe.EncryptionConfiguration(footer_key="footer-k", column_keys={"col-k": ["messages"]},
                                        encryption_algorithm="AES_GCM_V1", internal_key_material=internal,
                                        double_wrapping=True)
    props = factory.file_encryption_properties(pe.KmsConnectionConfig(kms_instance_id="vault-1"), config,
                                               parquet_file_path=path)
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"id": ["a", "b"], "messages": [[{"role": "user", "content": "hi"}],
                                                      [{"role": "assistant", "content": "hello"}]]},
                     schema=pa.schema([("id", pa.string()), ("messages", pa.list_(msg))]))
    pq.write_table(table, path, encryption_properties=props)
''')


def _kms_class():
    namespace: dict = {}
    exec(KMS_SOURCE, namespace)  # the same independent KMS, configured on the reading side
    return namespace["VaultLikeKms"]


@pytest.mark.parametrize("material", ["external", "internal"])
def test_reads_files_from_another_pme_writer(tmp_path, material):
    import pyarrow.parquet.encryption as pe

    path = tmp_path / "spark-out.parquet.encrypted"
    subprocess.run([sys.executable, "-c", WRITER, str(path), material], check=True, timeout=120)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    assert (len(siblings) == 2) == (material == "external"), siblings  # external: key material file beside it
    kms = _kms_class()
    table = read_pme_table(path, kms_client_factory=lambda cfg: kms(MASTER_KEYS),
                           kms_connection_config=pe.KmsConnectionConfig(kms_instance_id="vault-1"))
    assert table.to_pylist()[1] == {"id": "b", "messages": [{"role": "assistant", "content": "hello"}]}
    wrong = {"footer-k": bytes(32), "col-k": bytes(32)}
    with pytest.raises(SealedDataError, match="cannot be decrypted with the configured KMS"):
        read_pme_table(path, kms_client_factory=lambda cfg: kms(wrong),
                       kms_connection_config=pe.KmsConnectionConfig(kms_instance_id="vault-2"))
