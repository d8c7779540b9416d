"""NVIDIA reference integrity manifests (RIMs): signed SWID XML with the expected GPU measurements.

A RIM is accepted when its enveloped XML signature (ECDSA-SHA384, C14N 1.1, checked by `signxml`) verifies with the
signer certificate in its KeyInfo and that certificate chains, link by link, to the RIM root pinned in the store
(`<rim_store>/rim_root.pem`). Measurement index i of a RIM is SPDM measurement block i + 1; only `active="True"`
entries are reference values, each with one or more alternatives (attributes Hash0, Hash1, ...).

A GPU report is compared with two RIMs only: the driver RIM whose `colloquialVersion` is the driver version the
report's signed opaque data states, and the VBIOS RIM of its VBIOS version (as nvtrust and Trustee's
`*_rim_version_match` claims do). Other RIMs in the store are ignored, never pooled: a value from another version's
RIM cannot stand in for this version's.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from medtee.attestation.certs import issuer_problem, issuing_problem, parse_certificates, parse_der
from medtee.attestation.evidence import EvidenceFormatError
from medtee.attestation.verdict import Check, check

if TYPE_CHECKING:
    from medtee.attestation.nvidia import SpdmMeasurements

RIM_ROOT_FILE = "rim_root.pem"
SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"


class RimError(EvidenceFormatError):
    """A RIM that is unreadable, unsigned, tampered with, or not signed under the pinned RIM root."""


@dataclass(frozen=True)
class Rim:
    """A verified RIM: its tagId, version and active measurements (RIM index -> allowed values)."""

    file: str
    tag_id: str
    version: str
    measurements: dict[int, tuple[bytes, ...]]


def _keyinfo_chain(doc) -> list[x509.Certificate]:
    """The KeyInfo certificates ordered signer first, each followed by its issuer."""
    certs = []
    for i, e in enumerate((e for e in doc.iter(f"{{{DSIG_NS}}}X509Certificate") if e.text), 1):
        try:
            der = base64.b64decode("".join(e.text.split()))
        except ValueError:
            raise RimError(f"KeyInfo certificate {i}: not base64") from None
        try:
            certs.append(parse_der(der))
        except EvidenceFormatError as exc:
            raise RimError(f"KeyInfo certificate {i}: {exc}") from None
    if not certs:
        raise RimError("no signer certificate in KeyInfo (unsigned?)")
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers and c.issuer != c.subject] or certs[:1]
    chain = [leaves[0]]
    by_subject = {c.subject: c for c in certs}
    while chain[-1].issuer != chain[-1].subject and chain[-1].issuer in by_subject and len(chain) <= len(certs):
        chain.append(by_subject[chain[-1].issuer])
    return chain


def _check_chain(chain: list[x509.Certificate], root: x509.Certificate, now: datetime) -> None:
    root_der = root.public_bytes(Encoding.DER)
    links = [c for c in chain if c.public_bytes(Encoding.DER) != root_der] + [root]
    for below, (cert, issuer) in enumerate(zip(links, links[1:])):
        if issuer_problem(cert, issuer):
            raise RimError(f"signer chain does not reach the pinned RIM root ({cert.subject.rfc4514_string()} "
                           f"is not signed by {issuer.subject.rfc4514_string()})")
        if problem := issuing_problem(issuer, below):
            raise RimError(f"signer chain: {issuer.subject.rfc4514_string()} may not sign "
                           f"{cert.subject.rfc4514_string()}: {problem}")
    for cert in links:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise RimError(f"certificate {cert.subject.rfc4514_string()} not valid at {now.isoformat()}")


def verify_rim(path: Path, root: x509.Certificate, now: datetime) -> Rim:
    """Verify one RIM file's signature and chain and parse its measurements from the signed content only."""
    from lxml import etree
    from signxml import SignatureConfiguration, SignatureMethod, XMLVerifier
    from signxml.exceptions import InvalidInput, InvalidSignature as XmlInvalidSignature

    try:
        data = path.read_bytes()
        doc = etree.fromstring(data, parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except (OSError, etree.XMLSyntaxError) as exc:
        raise RimError(f"not readable XML ({type(exc).__name__})") from None
    chain = _keyinfo_chain(doc)
    _check_chain(chain, root, now)
    config = SignatureConfiguration(signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
                                    verification_time=now)
    try:
        signed = XMLVerifier().verify(data, x509_cert=chain[0], expect_config=config).signed_xml
    except (XmlInvalidSignature, InvalidInput) as exc:
        raise RimError(f"XML signature invalid: {exc}") from None
    except etree.LxmlError as exc:  # schema or canonicalization failure inside the signature
        raise RimError(f"XML signature invalid ({type(exc).__name__})") from None
    if signed is None or signed.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise RimError("the signature does not cover the whole SoftwareIdentity document")
    meta = signed.find(f"{{{SWID_NS}}}Meta")
    measurements: dict[int, tuple[bytes, ...]] = {}
    for res in signed.iter(f"{{{SWID_NS}}}Resource"):
        if res.get("type") != "Measurement" or res.get("active", "").lower() != "true":
            continue
        try:
            index, count = int(res.get("index", "")), int(res.get("alternatives", "1"))
            values = tuple(bytes.fromhex(res.get(f"{{{HASH_NS}}}Hash{k}", "")) for k in range(count))
        except ValueError:
            raise RimError(f"measurement {res.get('name')}: bad index, alternatives or hash value") from None
        if not values or any(not v for v in values):
            raise RimError(f"measurement {res.get('name')}: missing Hash attributes")
        measurements[index] = values
    return Rim(file=path.name, tag_id=signed.get("tagId", ""),
               version=meta.get("colloquialVersion", "?") if meta is not None else "?", measurements=measurements)


def rim_root(store: Path) -> x509.Certificate:
    """The RIM root pinned in the store (NVIDIA's CoRIM signing root, provided by whoever curates the store)."""
    path = store / RIM_ROOT_FILE
    try:
        return parse_certificates(path.read_bytes())[0]
    except (OSError, EvidenceFormatError):
        raise RimError(f"no readable RIM root certificate at {path}: put NVIDIA's RIM root there as PEM") from None


def _short(value: bytes) -> str:
    return value.hex()[:16] + "..."


def _pick(rims: list[Rim], version: str | None, kind: str, path: Path, label: str) -> tuple[Rim | None, Check]:
    """The one RIM of the reported `version` (equal RIMs count once) and its check."""
    name = f"{label}.rim.{kind.lower()}"
    expected = f"one signed, allowed {kind} RIM for the reported version {version} in {path}"
    if version is None:
        return None, check(name, False, expected, f"the report carries no {kind} version")
    found = [r for r in rims if r.version.casefold() == version.casefold()]
    distinct = {tuple(sorted(r.measurements.items())) for r in found}
    if len(distinct) == 1:
        rim = found[0]
        return rim, check(name, True, expected, f"{rim.file} ({rim.version})")
    if not found:
        held = ", ".join(f"{r.file} ({r.version})" for r in rims) or "none"
        return None, check(name, False, expected, f"none (the store has: {held}); add the {kind} RIM of version "
                           f"{version}, or update the GPU's {kind}")
    return None, check(name, False, expected, f"{len(distinct)} RIMs of version {version} with different reference "
                       f"values ({', '.join(r.file for r in found)}); keep the one NVIDIA publishes")


def rim_checks(spdm: SpdmMeasurements, store: str, allowed_ids: list[str], now: datetime,
               label: str) -> list[Check]:
    """The driver RIM of the reported driver version and the VBIOS RIM of the reported VBIOS version (no other RIM
    in the store counts), no index active in both, and each active index i equal to one of its RIM's alternatives
    for SPDM block i + 1."""
    path = Path(store)
    try:
        import signxml  # noqa: F401
    except ImportError:
        return [check(f"{label}.rim.verifier", False, "signxml installed (the 'nvidia' extra)", "not installed")]
    try:
        root = rim_root(path)
    except RimError as exc:
        return [check(f"{label}.rim.store", False, f"{RIM_ROOT_FILE} in {path}", exc)]
    out: list[Check] = []
    rims: list[Rim] = []
    for file in sorted(path.glob("*.swidtag")):
        try:
            rim = verify_rim(file, root, now)
        except RimError as exc:
            out.append(check(f"{label}.rim.signature[{file.name}]", False, "signed under the pinned RIM root", exc))
            continue
        if allowed_ids and rim.tag_id not in allowed_ids:
            continue
        rims.append(rim)
    driver, driver_check = _pick(rims, spdm.driver_version, "driver", path, label)
    vbios, vbios_check = _pick(rims, spdm.vbios_version, "VBIOS", path, label)
    out += [driver_check, vbios_check]
    if driver is None or vbios is None:
        return out
    both = sorted(set(driver.measurements) & set(vbios.measurements))
    out.append(check(f"{label}.rim.conflict", not both, "no measurement index active in both the driver and the "
                     "VBIOS RIM", f"indices {both} active in {driver.file} and {vbios.file}" if both else "none"))
    if both:
        return out
    bad = []
    for rim in (driver, vbios):
        for index in sorted(rim.measurements):
            actual = spdm.measurements.get(index + 1)
            if actual not in rim.measurements[index]:
                bad.append(index)
                alternatives = " | ".join(sorted(_short(v) for v in rim.measurements[index]))
                out.append(check(f"{label}.rim.measurement[{index}]", False, f"{alternatives} ({rim.file})",
                                 _short(actual) if actual is not None else f"no SPDM block {index + 1}"))
    total, names = len(driver.measurements) + len(vbios.measurements), f"{driver.file}, {vbios.file}"
    out.append(check(f"{label}.rim.measurements", not bad, f"all {total} active RIM measurements match ({names})",
                     f"{len(bad)} of {total} differ: indices {sorted(bad)}" if bad else "all match"))
    return out
