"""NVIDIA Hopper GPU evidence: the SPDM 1.1 GET_MEASUREMENTS exchange, its signature, the device certificate chain
to the bundled NVIDIA Device Identity CA, the FWID, the nonce, versions, and (per policy) RIMs and OCSP revocation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from medtee.attestation.certs import common_name, issuer_problem, issuing_problem, parse_each
from medtee.attestation.evidence import EvidenceFormatError, GpuEvidence
from medtee.attestation.freshness import Newest
from medtee.attestation.policy import AttestationPolicy, Revocation
from medtee.attestation.verdict import Check, check

DEVICE_ROOT = Path(__file__).resolve().parent / "roots" / "nvidia" / "device_identity_root.pem"
REQUEST_SIZE = 37
SIGNATURE_SIZE = 96
OPAQUE_DRIVER_VERSION, OPAQUE_VBIOS_VERSION, OPAQUE_FWID = 3, 6, 20
OPAQUE_CHIP_SKU, OPAQUE_PROJECT, OPAQUE_PROJECT_SKU = 15, 17, 18
DICE_TCB_INFO_OID = "2.23.133.5.4.1"
FWID_MAX_DEPTH = 8  # TCG DICE TcbInfo nests the FWID 3 levels deep; deeper DER is not searched


class SpdmFormatError(EvidenceFormatError):
    """The bytes are not an SPDM 1.1 GET_MEASUREMENTS request and response."""


@dataclass(frozen=True)
class SpdmMeasurements:
    """A parsed GET_MEASUREMENTS exchange."""

    request: bytes
    response_signed: bytes  # the response without its signature
    signature: bytes  # r || s, big-endian, 48 bytes each
    nonce: bytes  # the requester's nonce (request bytes 4..36)
    response_nonce: bytes
    measurements: dict[int, bytes]  # block index -> DMTF measurement value
    opaque: dict[int, bytes]

    @property
    def driver_version(self) -> str | None:
        value = self.opaque.get(OPAQUE_DRIVER_VERSION)
        return value.rstrip(b"\0").decode("ascii", "replace") if value else None

    @property
    def vbios_version(self) -> str | None:
        """Dotted hex as NVIDIA prints it (e.g. 96.00.9F.00.01): bytes 3, 2, 1, 0, 4 of the opaque value."""
        value = self.opaque.get(OPAQUE_VBIOS_VERSION)
        if not value or len(value) < 5:
            return None
        return ".".join(f"{value[i]:02X}" for i in (3, 2, 1, 0, 4))

    @property
    def fwid(self) -> bytes | None:
        return self.opaque.get(OPAQUE_FWID)

    @property
    def board(self) -> str | None:
        """PROJECT-PROJECT_SKU-CHIP_SKU (e.g. 1010-0200-882), as NVIDIA names a board's VBIOS RIM; None if absent."""
        parts = [self.opaque.get(i, b"").rstrip(b"\0").strip().decode("ascii", "replace").upper()
                 for i in (OPAQUE_PROJECT, OPAQUE_PROJECT_SKU, OPAQUE_CHIP_SKU)]
        return "-".join(parts) if all(parts) else None


def _take(data: bytes, pos: int, size: int, what: str) -> tuple[bytes, int]:
    if pos + size > len(data):
        raise SpdmFormatError(f"SPDM report truncated in {what} (need {size} bytes at offset {pos}, have {len(data)})")
    return data[pos : pos + size], pos + size


def parse_spdm(data: bytes) -> SpdmMeasurements:
    """Parse request || response by structure; trailing bytes after the signature must be zero."""
    request, pos = _take(data, 0, REQUEST_SIZE, "the request")
    if request[0] != 0x11 or request[1] != 0xE0:
        raise SpdmFormatError(f"not an SPDM 1.1 GET_MEASUREMENTS request (version {request[0]:#x}, code {request[1]:#x})")
    start = pos
    header, pos = _take(data, pos, 8, "the response header")
    if header[0] != 0x11 or header[1] != 0x60:
        raise SpdmFormatError(f"not an SPDM 1.1 MEASUREMENTS response (version {header[0]:#x}, code {header[1]:#x})")
    count, record_len = header[4], int.from_bytes(header[5:8], "little")
    record, pos = _take(data, pos, record_len, "the measurement record")
    measurements: dict[int, bytes] = {}
    r = 0
    for _ in range(count):
        block, r2 = _take(record, r, 4, "a measurement block header")
        index, size = block[0], int.from_bytes(block[2:4], "little")
        body, r = _take(record, r2, size, f"measurement block {index}")
        if size < 3 or int.from_bytes(body[1:3], "little") != size - 3:
            raise SpdmFormatError(f"measurement block {index}: DMTF size does not match the block size")
        measurements[index] = body[3:]
    if r != record_len:
        raise SpdmFormatError(f"measurement record: {record_len - r} bytes left after {count} blocks")
    response_nonce, pos = _take(data, pos, 32, "the response nonce")
    opaque_len_raw, pos = _take(data, pos, 2, "the opaque length")
    opaque_raw, pos = _take(data, pos, int.from_bytes(opaque_len_raw, "little"), "the opaque data")
    opaque: dict[int, bytes] = {}
    o = 0
    while o < len(opaque_raw):
        tl, o = _take(opaque_raw, o, 4, "an opaque field header")
        value, o = _take(opaque_raw, o, int.from_bytes(tl[2:4], "little"), "an opaque field")
        opaque[int.from_bytes(tl[:2], "little")] = value
    signed_end = pos
    signature, pos = _take(data, pos, SIGNATURE_SIZE, "the signature")
    if any(data[pos:]):
        raise SpdmFormatError(f"{len(data) - pos} unexpected non-zero bytes after the signature")
    return SpdmMeasurements(request=request, response_signed=data[start:signed_end], signature=signature,
                            nonce=request[4:36], response_nonce=response_nonce, measurements=measurements, opaque=opaque)


def parse_hex_report(text: str | bytes) -> bytes:
    """The GPU report from hex text (as NVML's bytes are usually stored); raises EvidenceFormatError."""
    try:
        return bytes.fromhex("".join((text.decode("ascii") if isinstance(text, bytes) else text).split()))
    except ValueError:  # UnicodeDecodeError included
        raise EvidenceFormatError("not hex text (expected a GPU's SPDM request||response as hex)") from None


@cache
def device_root() -> x509.Certificate:
    """The bundled NVIDIA Device Identity CA."""
    return x509.load_pem_x509_certificate(DEVICE_ROOT.read_bytes())


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at pos: (tag, value, next position)."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length, pos = int.from_bytes(data[pos : pos + n], "big"), pos + n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos : pos + length], pos + length


def _find_fwid(data: bytes, depth: int = 0) -> bytes | None:
    """Depth-first: the digest of the first SEQUENCE { OID, OCTET STRING } (an FWID) inside DER data."""
    pos = 0
    while pos < len(data) and depth <= FWID_MAX_DEPTH:
        tag, value, pos = _tlv(data, pos)
        if tag & 0x20:  # constructed
            children, cpos = [], 0
            while cpos < len(value) and len(children) < 3:
                ctag, cval, cpos = _tlv(value, cpos)
                children.append((ctag, cval))
            if tag == 0x30 and len(children) == 2 and children[0][0] == 0x06 and children[1][0] == 0x04:
                return children[1][1]
            found = _find_fwid(value, depth + 1)
            if found is not None:
                return found
    return None


def cert_fwid(cert: x509.Certificate) -> bytes | None:
    """The FWID digest in the leaf's TCG DICE extension (2.23.133.5.4.1), or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(DICE_TCB_INFO_OID)).value
        return _find_fwid(ext.value)
    except (x509.ExtensionNotFound, ValueError, IndexError):
        return None


def chain_checks(certs: list[x509.Certificate], now: datetime, label: str) -> list[Check]:
    """Leaf first, each link directly issued by the next, ending at the pinned NVIDIA Device Identity CA."""
    root = device_root()
    root_der = root.public_bytes(Encoding.DER)
    out = [check(f"{label}.chain.length", len(certs) >= 2, "leaf ... NVIDIA Device Identity CA (>= 2 certificates)",
                 f"{len(certs)} certificate(s)")]
    if not certs:
        return out
    chain = list(certs)
    if chain[-1].public_bytes(Encoding.DER) != root_der:
        chain.append(root)  # the root may be omitted; a different "root" fails the last link below
    broken = [f"link {i} ({common_name(cert)} <- {common_name(issuer)})"
              for i, (cert, issuer) in enumerate(zip(chain, chain[1:])) if issuer_problem(cert, issuer)]
    broken += [f"link {i} ({common_name(issuer)}: {problem})" for i, issuer in enumerate(chain[1:])
               if (problem := issuing_problem(issuer, below=i))]
    out.append(check(f"{label}.chain", not broken, "every link signed by the next, a CA, up to the pinned NVIDIA "
                     "root", "; ".join(broken) or "valid"))
    expired = [common_name(c) for c in chain if not c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    out.append(check(f"{label}.chain.validity", not expired, f"all valid at {now.isoformat()}",
                     ", ".join(expired) or "all valid"))
    return out


def _version_at_least(actual: str | None, minimum: str, hexa: bool) -> bool:
    if actual is None:
        return False
    conv = (lambda t: tuple(int(p, 16) for p in t.split("."))) if hexa else (lambda t: tuple(int(p) for p in t.split(".")))
    try:
        return conv(actual) >= conv(minimum)
    except ValueError:
        return False


def gpu_evidence_checks(gpu: GpuEvidence, policy: AttestationPolicy, *, expected_nonce: bytes | None,
                        now: datetime, label: str = "gpu", newest: Newest | None = None) -> list[Check]:
    """Authenticity (structure, chain, FWID, signature, nonce) and, unless authenticity_only, the GPU policy.
    A malformed report or certificate fails `<label>.report.format` or `<label>.certificates` alone."""
    certs, problems = parse_each(gpu.certificates)
    malformed = ([check(f"{label}.certificates", False, "a parsable X.509 certificate", "; ".join(problems))]
                 if problems else [])
    try:
        spdm = parse_spdm(gpu.report)
    except SpdmFormatError as exc:
        expected = "an SPDM 1.1 GET_MEASUREMENTS request||response"
        return [check(f"{label}.report.format", False, expected, exc)] + malformed
    if malformed:
        return malformed
    out = chain_checks(certs, now, label)
    if certs:
        leaf = certs[0]
        fwid = cert_fwid(leaf)
        out.append(check(f"{label}.fwid", fwid is not None and fwid == spdm.fwid,
                         f"leaf FWID equal to the report's ({(spdm.fwid or b'').hex()[:16]}...)",
                         f"{fwid.hex()[:16]}... in {common_name(leaf)}" if fwid
                         else f"no FWID in {common_name(leaf)}"))
        out.append(_signature_check(spdm, leaf, label))
    out.append(check(f"{label}.response_nonce", len(spdm.response_nonce) == 32, "32-byte responder nonce",
                     len(spdm.response_nonce)))
    if expected_nonce is not None:
        out.append(check(f"{label}.nonce", spdm.nonce == expected_nonce, expected_nonce.hex(), spdm.nonce.hex()))
    elif policy.require_binding and not policy.authenticity_only:
        out.append(check(f"{label}.nonce", False, "a GPU nonce computed by the relying party", "none given"))
    if not policy.authenticity_only:
        out += _policy_checks(gpu, spdm, policy, label)
        if policy.gpu.require_rim_match:
            from medtee.attestation.rim import rim_checks

            out += rim_checks(spdm, policy.gpu.rim_store or "", policy.gpu.allowed_rim_ids, now, label)
        if policy.gpu.revocation is not Revocation.off:
            out.append(revocation_check(certs, policy.gpu.revocation, policy.gpu.ocsp_cache, now, label, newest))
    return out


def revocation_check(certs: list[x509.Certificate], stance: Revocation, cache_dir: str | None, now: datetime,
                     label: str, newest: Newest | None = None) -> Check:
    """OCSP status of each certificate below the root (from the cache); revoked or refused (an older answer put back,
    one undoing a revocation) always fails, unknown per stance."""
    from medtee.attestation.ocsp import REFUSED, REVOKED, UNKNOWN, revocation_status

    root = device_root()
    chain = list(certs)
    if not chain or chain[-1].public_bytes(Encoding.DER) != root.public_bytes(Encoding.DER):
        chain.append(root)
    results = [(common_name(c), *revocation_status(c, issuer, cache_dir, now, newest))
               for c, issuer in zip(chain, chain[1:])]
    revoked = any(status in (REVOKED, REFUSED) for _, status, _ in results)
    unknown = any(status == UNKNOWN for _, status, _ in results)
    ok = not revoked and (not unknown or stance is Revocation.fail_open)
    actual = "; ".join(f"{cn}: {why}" for cn, _, why in results) or "no certificates"
    if ok and unknown:
        actual = "WARNING, not established (fail-open): " + actual
    return check(f"{label}.revocation", ok and bool(results), f"OCSP good for every certificate ({stance.value})", actual)


def _signature_check(spdm: SpdmMeasurements, leaf: x509.Certificate, label: str) -> Check:
    key = leaf.public_key()
    expected = f"ECDSA P-384 signature by {common_name(leaf)} over request||response"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return check(f"{label}.signature", False, expected, "leaf key is not EC")
    r, s = int.from_bytes(spdm.signature[:48], "big"), int.from_bytes(spdm.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), spdm.request + spdm.response_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return check(f"{label}.signature", False, expected, "invalid signature")
    return check(f"{label}.signature", True, expected, "valid")


def _policy_checks(gpu: GpuEvidence, spdm: SpdmMeasurements, policy: AttestationPolicy, label: str) -> list[Check]:
    gp = policy.gpu
    out = []
    if gp.require_cc_mode:
        out.append(check(f"{label}.cc_mode", gpu.cc_feature is True, "confidential computing ON (NVML)",
                         {True: "ON", False: "OFF", None: "not reported"}[gpu.cc_feature]))
    if gp.forbid_devtools:
        out.append(check(f"{label}.devtools", gpu.devtools_mode is False, "developer-tools mode OFF (NVML)",
                         {True: "ON", False: "OFF", None: "not reported"}[gpu.devtools_mode]))
    out.append(check(f"{label}.driver_version", _version_at_least(spdm.driver_version, gp.min_driver_version, False),
                     f">= {gp.min_driver_version}", spdm.driver_version))
    out.append(check(f"{label}.vbios_version", _version_at_least(spdm.vbios_version, gp.min_vbios_version, True),
                     f">= {gp.min_vbios_version}", spdm.vbios_version))
    out.append(check(f"{label}.board", not gp.boards or spdm.board in gp.boards,
                     f"one of {gp.boards}" if gp.boards else "any (gpu.boards pins none)", spdm.board))
    return out

