"""The one place that knows the order: recipe -> environment -> evidence -> key release -> loader -> training ->
guarded tracking -> encrypted outputs -> summary.

`main(cfg)` returns an exit code: 0 done, 1 refused (environment or attestation), 2 bad configuration or input,
3 the run failed (reported without the exception message).
A run refused before training leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from medtee import config, exits, hardware
from medtee.schema import differing

say = exits.say

#: The metrics a run's summary and receipt keep (their last values; every value went to MLflow as it came).
FINAL_METRICS = ("train/loss", "train/epsilon", "val/loss", "val/perplexity")

#: Where a demo run seals its synthetic dialogues, inside its run directory (an input, not an output).
SYNTHETIC_DIR = "synthetic-sealed"


class Refused(Exception):
    """The run may not proceed (environment or attestation); the message lists every reason."""


def main(cfg, *, mode: str = "train") -> int:
    """One job of `medtee train` (mode train) or `medtee eval run` (mode eval); its exit code."""
    from hydra.core.hydra_config import HydraConfig

    from medtee import containment
    from medtee.broker.audit import AuditLogDamaged
    from medtee.broker.store import StoreError
    from medtee.broker.client import BrokerError
    from medtee.broker.protocol import ChallengeRefused
    from medtee.data import DataError
    from medtee.sealing.manifest import SealedDataError

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    recipe = hc.runtime.choices.get("recipe") or "custom"
    try:
        config.check_job(cfg, dict(hc.runtime.choices))  # this job's own config: a multirun combines sweep values
        with _contain(cfg):
            return train(cfg, recipe=recipe, out_dir=out_dir, mode=mode)
    except config.ConfigError as exc:
        say(f"configuration error: {exc}")
        return exits.BAD_INPUT
    except SealedDataError as exc:
        say(f"sealed dataset rejected: {exc}")
        return exits.BAD_INPUT
    except DataError as exc:
        say(f"input rejected: {exc}")
        return exits.BAD_INPUT
    except (Refused, BrokerError, ChallengeRefused, AuditLogDamaged, StoreError) as exc:  # the broker is down or refuses
        say(f"refused: {exc}")
        return exits.REFUSED
    except containment.SafeError as exc:
        say(f"run failed: {exc}")
        return exits.FAILED
    except KeyboardInterrupt:  # the run's end (teardown, close, receipt) has run on the way out
        say(f"interrupted (Ctrl-C){_resume_hint(out_dir)}")
        return exits.INTERRUPTED
    except Exception as exc:  # report where, never what: a message or repr may quote a batch
        for i, line in enumerate(containment.failure_report(exc)):
            say(f"run failed: {line}" if i == 0 else line)
        return exits.FAILED
    finally:
        _remove_if_empty(out_dir)


@contextlib.contextmanager
def _contain(cfg):
    """The run's containment (medtee.containment): no core dumps, offline libraries, scrubbed logs, warnings and
    exceptions, temporary files in memory. A production profile that would reach any host but the tracking server
    and the key broker is refused first."""
    from medtee import containment

    config.apply_environment(cfg)
    problems = production_egress(cfg)
    if problems:
        raise Refused("; ".join(problems))
    with containment.contained():
        yield


def production_egress(cfg) -> list[str]:
    """Why a production profile may not start with this recipe and environment (`containment.egress_problems`);
    empty outside production."""
    from medtee import containment

    if not cfg.hardware.production:
        return []
    return containment.egress_problems(tracking_uri=cfg.tracking.tracking_uri, broker_url=cfg.broker.url,
                                       data_path=cfg.data.path,
                                       weights_id=cfg.model.id if cfg.model.source == "pretrained" else None,
                                       sweep_storage=cfg.sweep.storage if cfg.sweep is not None else None)


def _resume_hint(out_dir: Path) -> str:
    latest = sorted((out_dir / "checkpoints").glob("step-*.ckpt.enc"))
    return f": resume with trainer.resume_from={latest[-1]}" if latest else ""


def _remove_if_empty(path: Path) -> None:
    """Hydra creates the run directory before medtee may refuse; take it (and empty parents) back."""
    stop = Path.cwd().resolve()
    path = path.resolve()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def train(cfg, *, recipe: str, out_dir: Path, mode: str = "train") -> int:
    """The checks that need no data, then the run (mode train: `_fit`; eval: `_evaluate`). Raises ConfigError,
    SealedDataError, DataError or Refused."""
    from medtee.files import NotRegularFile
    from medtee.training.model import pretrained_problems, weight_digests

    config.check(cfg)
    config.check_runnable(cfg, mode=mode)
    problems = input_problems(cfg, mode)
    if problems:
        raise config.ConfigError("; ".join(problems))
    keys = Keys.read(cfg, mode)
    preflight(cfg)
    try:  # pretrained weights enter the digest by content ({} for a tiny model)
        weights = weight_digests(cfg.model)
    except FileNotFoundError as exc:
        raise config.ConfigError(str(exc)) from None
    except NotRegularFile as exc:  # a FIFO or folder named like a weight file
        raise config.ConfigError(f"model.id={cfg.model.id}: a weight file {exc}; name a folder of regular weight "
                                 f"files") from None
    if problems := pretrained_problems(cfg.model):
        raise config.ConfigError("; ".join(problems))
    digest = config.recipe_digest(cfg, weights=weights or None, mode=mode, files=keys.files(cfg))
    say(f"recipe {recipe}, digest {digest} (mode {mode})")
    work = {"train": _fit, "eval": _evaluate, "generate": _generate, "sweep": _sweep}[mode]
    return attested_run(cfg, recipe=recipe, digest=digest, out_dir=out_dir, weights=weights, keys=keys, mode=mode,
                        work=work)


@dataclass(frozen=True)
class Keys:
    """The public keys a run's outputs are encrypted to, read once before its digest: the adapter's recipient and
    (`medtee generate`) the study owner's key and the blinding custodian's. The digest hashes exactly these bytes and
    the outputs are encrypted to them, so a key file replaced on the host after the digest (or the release) changes
    nothing."""

    recipient: object  # medtee.training.output.Recipient; None for output.recipient=dev (read when written)
    study: object = None  # medtee.crypto.hpke.PublicKeyFile
    blinding: object = None  # medtee.crypto.hpke.PublicKeyFile; None: the blinding is sealed to the study key

    @classmethod
    def read(cls, cfg, mode: str) -> "Keys":
        from medtee.crypto.hpke import KeyWrapError, read_public_key_file
        from medtee.training.output import recipient

        problems, study, blinding, found = [], None, None, None
        try:  # the development key is made on first use, once the run has something to encrypt
            found = None if cfg.output.recipient == "dev" else recipient(cfg.output.recipient, scheme=None)
        except ValueError as exc:
            problems.append(str(exc))
        if mode == "generate":
            try:
                study = read_public_key_file(cfg.evaluation.study_recipient)
            except (OSError, KeyWrapError) as exc:
                problems.append(f"evaluation.study_recipient={cfg.evaluation.study_recipient}: {exc}; name the study "
                                f"owner's public key file (`medtee keys new` writes NAME.pub)")
        if mode == "generate" and cfg.evaluation.blinding_recipient:
            try:
                blinding = read_public_key_file(cfg.evaluation.blinding_recipient)
            except (OSError, KeyWrapError) as exc:
                problems.append(f"evaluation.blinding_recipient={cfg.evaluation.blinding_recipient}: {exc}; name the "
                                f"custodian's public key file (`medtee keys new` writes NAME.pub)")
            if study is not None and blinding is not None and blinding.public == study.public:
                problems.append(f"evaluation.blinding_recipient={cfg.evaluation.blinding_recipient} is the study "
                                f"owner's key: the custodian of the blinding holds a key of their own")
        if problems:
            raise config.ConfigError("; ".join(problems))
        return cls(recipient=found, study=study, blinding=blinding)

    def files(self, cfg) -> dict[str, bytes]:
        """The FILES_IN_DIGEST values these keys were read from -> the bytes read (the development recipient is
        recorded as `dev`)."""
        out = {} if self.recipient is None else {"output.recipient": self.recipient.key.data}
        if self.study is not None:
            out["evaluation.study_recipient"] = self.study.data
        if self.blinding is not None:
            out["evaluation.blinding_recipient"] = self.blinding.data
        return out

    def adapter_recipient(self, cfg):
        """What the adapter is encrypted to: the recipient read before the digest, or the development key."""
        from medtee.training.output import recipient

        return self.recipient or recipient("dev", scheme=cfg.encryption.scheme)


def input_problems(cfg, mode: str) -> list[str]:
    """What the run would find wrong only after the key release, checked before it: the encrypted files it opens
    (by their header), every file the digest names (it must exist: its content is what is recorded) and the
    embedded broker's store a sealed dataset needs."""
    from medtee.broker.protocol import DEFAULT_BROKER_DIR
    from medtee.crypto.stream import header_problem
    from medtee.files import not_a_file

    out = []
    files = {"train": [("trainer.resume_from", cfg.trainer.resume_from, "a step-NNNNNNN.ckpt.enc from a run's "
                                                                          "checkpoints/ directory")],
             "eval": [("evaluation.adapter", cfg.evaluation.adapter, "the adapter.sealed a training run on this "
                                                                       "dataset wrote")]}
    files["generate"], files["sweep"] = files["eval"], []
    for key, value, fix in files[mode]:
        if not value:
            continue
        if not Path(value).is_file():
            out.append(f"{key}={value} {not_a_file(value)}: name {fix}")
        elif problem := header_problem(value):
            out.append(f"{key}={value} {problem}: name {fix}")
    checked = {key for key, *_ in files[mode]}
    out += [f"{key}={value} {not_a_file(value)}: the recipe digest covers that file's content, so name an existing "
            f"file (or leave it unset)" for key, value in config.unhashable_files(cfg) if key not in checked]
    if mode == "sweep":
        out += _sweep_problems(cfg)
    b = cfg.broker
    if cfg.data.source == "sealed" and str(b.url) == "embedded" and not (Path(b.dir) / "broker.key").is_file():
        out.append(f"broker.dir={b.dir} holds no key broker (no broker.key): name the store the dataset was sealed "
                   f"against (`medtee seal --broker-dir`; default {DEFAULT_BROKER_DIR}), or set broker.url to the "
                   f"owner's broker")
    return out


def _sweep_problems(cfg) -> list[str]:
    """A sweep whose study cannot be stored, or whose objective no trial can log, would spend every trial."""
    from urllib.parse import urlsplit

    out = []
    s, t, d = cfg.sweep, cfg.trainer, cfg.data
    parts = urlsplit(str(s.storage))
    if parts.scheme == "sqlite" and parts.path.startswith("/") and not Path(parts.path[1:] or ".").parent.is_dir():
        out.append(f"sweep.storage={s.storage}: the directory {Path(parts.path[1:]).parent} does not exist; create it "
                   f"or store the study elsewhere")
    if str(s.objective).startswith("val/"):
        batches = t.max_steps * t.accumulate_grad_batches
        if not t.limit_val_batches or t.val_check_interval > batches:
            out.append(f"sweep.objective={s.objective} is logged at validation, which no trial reaches "
                       f"(trainer.val_check_interval={t.val_check_interval} training batches, trainer.max_steps="
                       f"{t.max_steps} x accumulate_grad_batches={t.accumulate_grad_batches}, limit_val_batches="
                       f"{t.limit_val_batches}): lower trainer.val_check_interval or raise trainer.max_steps")
        elif t.limit_val_batches * d.batch_size < cfg.tracking.min_aggregate:
            out.append(f"sweep.objective={s.objective} covers at most limit_val_batches x batch_size = "
                       f"{t.limit_val_batches * d.batch_size} held-out dialogues, fewer than tracking.min_aggregate="
                       f"{cfg.tracking.min_aggregate}, so the tracking guard drops it: raise trainer.limit_val_batches")
    return out


def preflight(cfg) -> None:
    """Check the machine against the hardware profile and the evidence providers; raise Refused listing why."""
    from medtee import attestation

    problems = hardware.mismatches(cfg.hardware) + _random_weights_problems(cfg)
    att = cfg.attestation
    problems += attestation.unavailable_reasons(att.provider.value, att.gpu_provider and att.gpu_provider.value)
    if problems:
        raise Refused("; ".join(problems))


def _random_weights_problems(cfg) -> list[str]:
    """Whether this machine can hold the random weights `model.source=random` draws whole in `model.dtype` on the
    training device, then writes to the temporary directory to load them quantized (an out-of-memory kill after
    the key release would skip the teardown)."""
    if cfg.model.source != "random" or cfg.hardware.production:
        return []
    import shutil
    import tempfile

    from medtee.training.config import ARCHITECTURES, Architecture, random_parameter_count

    m, cuda = cfg.model, cfg.hardware.accelerator == "cuda"
    count = random_parameter_count(m)
    size = count * {"float32": 4}.get(m.dtype.value, 2)
    temp = tempfile.gettempdir()
    host_need = size if cuda else 2 * size  # the drawn model (on CPU) and its copy in a memory temp dir
    needs = [("the GPU", size, hardware.free_gpu_memory())] if cuda else []
    needs += [("the host", host_need, hardware.free_host_memory()), (f"the temporary directory {temp}", size,
                                                                      shutil.disk_usage(temp).free)]
    short = [f"{where} needs {need / 2**30:.1f} GiB and has {free / 2**30:.1f} GiB free"
             for where, need, free in needs if free is not None and need > free]
    if not short:
        return []
    dims = ARCHITECTURES[Architecture(m.architecture)]
    layers = m.num_layers or dims["num_hidden_layers"]
    per_layer = (count - dims["vocab_size"] * dims["hidden_size"]) / layers * size / count
    return [f"model.source=random draws {count / 1e9:.1f}e9 parameters in {m.dtype.value} ({size / 2**30:.1f} GiB) "
            f"and copies them once to load them quantized: {'; '.join(short)}; cut the depth with "
            f"model.num_layers=N (each {m.architecture.value} layer is {per_layer / 2**30:.2f} GiB)"]


@dataclass(frozen=True)
class Attested:
    """A released data key and what the receipt records of how it was released."""

    release: object  # medtee.broker.protocol.Release: the data key (a SecretBuffer) and the broker's record
    evidence: object  # the evidence the broker appraised
    verdict: object  # this run's own appraisal of it
    policy: object  # the recipe's attestation policy


def release_data_key(cfg, dataset, *, broker, recipe_digest: str, recipe: dict, receipt_public_key: bytes) -> Attested:
    """Challenge -> evidence bound to nonce, ephemeral key, recipe and receipt key -> broker appraisal -> data key in
    memory.

    The run first appraises its own evidence against the recipe's policy (a clear local error); the broker then
    appraises it independently against the dataset's release policy, which is what decides.
    """
    from medtee import attestation
    from medtee.broker.protocol import KeyReleaseDenied, obtain_data_key

    att, manifest = cfg.attestation, dataset.manifest
    policy = attestation.policy_from_mapping(att, "the recipe's attestation group")
    appraised = []

    def evidence_for(nonce: bytes, ephemeral_public_key: bytes):
        bound = dict(nonce=nonce, ephemeral_public_key=ephemeral_public_key, recipe_digest=recipe_digest,
                     receipt_public_key=receipt_public_key)
        evidence = attestation.collect_evidence(att.provider.value, att.gpu_provider and att.gpu_provider.value,
                                                **bound)
        expected = attestation.report_data(**bound, gpu_evidence_digests=evidence.gpu_evidence_digests())
        verdict = attestation.appraise(evidence, policy, expected_report_data=expected,
                                       expected_gpu_nonce=attestation.gpu_nonce(**bound), recipe_digest=recipe_digest,
                                       recipe=recipe)
        if not verdict.ok:
            raise Refused(f"evidence fails this recipe's attestation policy '{att.name}':\n{verdict.explain()}")
        appraised.append((evidence, verdict))
        return evidence

    from medtee.broker.protocol import UnknownDatasetError

    try:
        release = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                                  recipe_digest=recipe_digest, evidence_for=evidence_for,
                                  scheme=cfg.encryption.scheme, receipt_public_key=receipt_public_key,
                                  recipe=recipe)
    except KeyReleaseDenied as exc:
        raise Refused(f"the key broker denied the data key: {exc}") from None
    except UnknownDatasetError as exc:  # sealed against another broker, or broker.dir/url names the wrong one
        raise config.ConfigError(f"{exc} (or point broker.dir / broker.url at the broker it was sealed against)") from None
    evidence, verdict = appraised[-1]
    return Attested(release=release, evidence=evidence, verdict=verdict, policy=policy)


def _dataset_path(cfg, out_dir: Path, broker) -> Path:
    """The sealed dataset: the recipe's, or (data=synthetic) synthetic dialogues sealed now into the run directory."""
    if cfg.data.source == "sealed":
        return Path(cfg.data.path)
    from medtee.data.synthetic import generate_dialogues
    from medtee.sealing.seal import seal_records

    path = out_dir / SYNTHETIC_DIR
    seed, n = cfg.data.synthetic_seed, cfg.data.n_synthetic
    seal_records(generate_dialogues(n, seed=seed), path, broker=broker, policy=cfg.attestation.name,
                 dataset_id=f"synthetic-{seed}-{n}-{uuid.uuid4().hex[:12]}")
    say(f"sealed {cfg.data.n_synthetic} synthetic dialogues into {path}")
    return path


@dataclass
class Outcome:
    """What the work hands the run's end: the MLflow run, the aggregate metrics for the receipt, and on success what
    closes the MLflow run and reports (`finish(receipt_envelope)`)."""

    logger: object = None
    metrics: dict = field(default_factory=dict)
    finish: Callable[[dict | None], None] | None = None
    checkpoints: object = None  # the run's EncryptedCheckpointIO: the newest checkpoint it wrote (`last_written`)
    trainer: object = None  # the run's Lightning Trainer: the step training reached
    adapter_written: bool = False  # set once the adapter exists, before anything is disclosed of it

    def outputs(self) -> dict:
        """What the run's close tells the broker it left: whether it made an adapter, and the SHA-256 of its newest
        checkpoint if training stopped at that checkpoint's step (else None: steps after it may have been disclosed,
        e.g. in validation metrics) with steps left to train (a resume of one at max_steps trains nothing and would
        only use up the free continuation), which a DP run resuming it continues without a second charge. (After a
        failed fit nothing of the model in memory is disclosed: the run only tears down, closes and signs.)"""
        io, step = self.checkpoints, getattr(self.trainer, "global_step", None)
        limit = getattr(self.trainer, "max_steps", -1)
        at_it = io is not None and io.last_written_step is not None and io.last_written_step == step and (
            limit in (None, -1) or step < limit)
        return {"adapter": self.adapter_written, "last_checkpoint": io.last_written if at_it else None}


@dataclass
class Session:
    """What the work of an attested run gets: the records (decrypted once, in memory), the dataset, this run's
    verdict, keys derived from the release (registered with the teardown), and the outcome to fill."""

    recipe: str
    digest: str
    recorded: dict  # the recipe as its digest covers it
    weights: dict  # pretrained weight file -> sha256 ({} for a tiny model)
    keys: Keys  # what the outputs are encrypted to, read before the digest
    out_dir: Path
    dataset: object
    verdict: object
    records: Callable[[], Iterable[dict]]
    teardown: object
    checkpoint_key: bytearray  # SecretBuffers
    adapter_key: bytearray
    # purpose -> the same keys as runs before 2026-12 derived them (from the manifest digest), to read what those wrote
    earlier_keys: dict = field(default_factory=dict)
    canaries: list = field(default_factory=list)  # the data owner's canaries (medtee.audit), decrypted in memory
    outcome: Outcome = field(default_factory=Outcome)
    mlflow_run_id: str | None = None  # an MLflow run to train into (a sweep trial's child run)


def attested_run(cfg, *, recipe: str, digest: str, out_dir: Path, weights: dict, keys: Keys, mode: str,
                 work: Callable[[object, Session], int]) -> int:
    """Release the data key, run `work(cfg, session)`, and end (success or failure) with the teardown, the release
    closed at the broker and the signed receipt."""
    from medtee import containment
    from medtee.broker import connect
    from medtee.crypto.secret import SecretBuffer
    from medtee.crypto.stream import derive_key
    from medtee.receipt.signing import ReceiptSigner
    from medtee.sealing.reader import open_dataset
    from medtee.teardown import Teardown

    b = cfg.broker
    broker = connect(b.url, store_dir=Path(b.dir), ca=b.ca, timeout_s=b.timeout_s)
    dataset = open_dataset(_dataset_path(cfg, out_dir, broker))  # every shard checked against the manifest
    if cfg.release.require_audit and dataset.manifest.canaries is None:
        raise config.ConfigError("release.require_audit=true audits the adapter with the data owner's canaries, but "
                                 "this dataset was sealed without any: seal it with `medtee seal ... --canaries N`")
    # the recipe as its digest covers it: without data.path (a directory name can name a patient or a study)
    recorded = config.digest_input(config.resolved(cfg), weights=weights or None, mode=mode, files=keys.files(cfg))
    signer = ReceiptSigner()  # in memory only; its public key is bound into the evidence
    started = datetime.now(timezone.utc)
    attested = release_data_key(cfg, dataset, broker=broker, recipe_digest=digest, recipe=recorded,
                                receipt_public_key=signer.public_bytes)
    teardown = Teardown()
    data_key = teardown.key("data key", attested.release.data_key)
    teardown.dropped("ephemeral private key", "held inside cryptography's HPKE context; freed once the key was "
                                              "unwrapped")
    teardown.dropped("receipt signing key", "held inside cryptography; freed once the receipt is signed")
    outcome, error = Outcome(), None
    try:
        dataset.check_key(data_key)
        # checkpoints and the sealed adapter are encrypted under keys derived from this dataset's release: opening
        # them needs the release again, i.e. attestation to pass again; from its content digest, so that a key
        # rotation (a new manifest digest) leaves them readable
        content, manifest_digest = dataset.manifest.content_digest(), dataset.manifest.digest()
        derived = {purpose: teardown.key(f"{purpose} key", SecretBuffer(derive_key(data_key, content, purpose)))
                   for purpose in ("checkpoint", "adapter")}
        earlier = {purpose: (teardown.key(f"earlier {purpose} key",
                                          SecretBuffer(derive_key(data_key, manifest_digest, purpose))),)
                   for purpose in ("checkpoint", "adapter")}
        verdict = attested.verdict
        say(f"attestation {verdict.policy}: {'PASS' if verdict.ok else 'FAIL'}"
            f"{' (SIMULATED)' if verdict.simulated else ''}; data key released; decrypting "
            f"{dataset.manifest.record_count} records into memory")
        session = Session(recipe=recipe, digest=digest, recorded=recorded, weights=weights, keys=keys,
                          out_dir=out_dir, dataset=dataset, verdict=verdict, teardown=teardown, outcome=outcome,
                          # decrypted one record batch at a time, straight into the data module's token arrays
                          records=functools.partial(_decrypted_records, dataset, data_key),
                          checkpoint_key=derived["checkpoint"], adapter_key=derived["adapter"], earlier_keys=earlier,
                          canaries=dataset.canaries(data_key))
        return work(cfg, session)
    except BaseException as exc:
        error = exc
        raise
    finally:
        with containment.sigterm_deferred():
            _end(cfg, outcome=outcome, error=error, teardown=teardown, broker=broker, attested=attested,
                 signer=signer, started=started, recorded=recorded, digest=digest, weights=weights, dataset=dataset,
                 out_dir=out_dir)


def _recorded_sha256(session: Session, section: str, key: str) -> str | None:
    """The sha256 the recorded recipe (what the digest covers) names for a file setting, to check the bytes opened
    after the release against."""
    value = session.recorded.get(section, {}).get(key)
    return value[len("sha256:"):] if isinstance(value, str) and value.startswith("sha256:") else None


def _decrypted_records(dataset, data_key: bytes):
    return (record for batch in dataset.iter_batches(data_key) for record in batch.to_pylist())


def read_records(cfg, session: Session, tokenizer):
    """The data module over the session's records, set up: every record decrypted, checked and tokenized once; the
    data key zeroed right after (it is needed no more); the token arrays registered with the teardown."""
    from medtee.data.module import DialogueDataModule

    d = cfg.data
    datamodule = DialogueDataModule(session.records, tokenizer, max_length=d.max_length, batch_size=d.batch_size,
                                    val_fraction=d.val_fraction, seed=d.seed, packing=d.packing,
                                    poisson=cfg.privacy.dp.enabled)  # DP-SGD's accountant assumes Poisson sampling
    session.records = None
    session.teardown.data("decrypted records", datamodule.destroy)
    datamodule.setup("fit")
    session.teardown.wipe("data key")
    return datamodule


def _fit(cfg, session: Session) -> int:
    """Train (or, trainer.validate_only, evaluate) on the session's records."""
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from medtee.tracking.logger import open_run, run_tags
    from medtee.training.checkpoint import CheckpointError, EncryptedCheckpointIO, resume_info
    from medtee.training.model import build_model, build_tokenizer
    from medtee.training.module import CausalLMModule

    t, hw, d = cfg.trainer, cfg.hardware, cfg.data
    rank_zero = rank_zero_only.rank == 0  # torchrun / SLURM: every process runs this flow; rank 0 reports
    if hw.cpu_threads:
        torch.set_num_threads(hw.cpu_threads)
    L.seed_everything(t.seed, verbose=False)
    device = "cuda" if hw.accelerator == "cuda" else "cpu"
    tokenizer = build_tokenizer(cfg.model)
    datamodule = read_records(cfg, session, tokenizer)
    stats = datamodule.stats()
    model = build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device=device,
                        sharded=t.strategy == "fsdp")
    module = CausalLMModule(model, t, dp=cfg.privacy.dp, dataset_size=stats["n_train"], batch_size=d.batch_size,
                            min_aggregate=cfg.tracking.min_aggregate)
    checkpoint_io = session.outcome.checkpoints = EncryptedCheckpointIO(
        session.checkpoint_key, earlier=session.earlier_keys.get("checkpoint", ()))
    try:
        resumed = (resume_info(checkpoint_io, t.resume_from, module, datamodule, world_size=hw.devices * hw.num_nodes,
                               max_steps=None if t.validate_only else t.max_steps,
                               sha256=_recorded_sha256(session, "trainer", "resume_from")) if t.resume_from else {})
    except CheckpointError as exc:
        raise config.ConfigError(str(exc)) from None

    digests = session.weights if rank_zero else {}
    mode = "validate" if t.validate_only else "train"
    logger = False
    if rank_zero:
        # a resumed training run continues its MLflow run; an evaluation run is a run of its own
        run_id = (resumed.get("mlflow_run_id") if not t.validate_only else None) or session.mlflow_run_id
        tags = run_tags(recipe=session.recipe, recipe_digest=session.digest,
                        dataset_digest=session.dataset.manifest.digest(), verdict=session.verdict,
                        hardware=hw.name, model=cfg.model, mode=mode, weight_digests=digests)
        # one evaluation pass covers at most limit_val_batches x batch_size held-out examples
        logger = session.outcome.logger = open_run(
            cfg.tracking, run_name=session.recipe, tags=tags, params=session.recorded, run_id=run_id,
            eval_examples=min(stats.get("n_val", 0), t.limit_val_batches * d.batch_size),
            manifest=session.dataset.manifest, context="evaluation" if t.validate_only else "training")
        # "continued" only for a resumed run: a sweep trial trains into the child run its study created for it
        note = (" (continued)" if run_id and run_id != session.mlflow_run_id
                else " (the sweep trial's child run)" if run_id else "")
        say(f"MLflow run {logger.run_id} in {logger.where}{note}")
    return _run_trainer(cfg, session, module=module, datamodule=datamodule, logger=logger, tokenizer=tokenizer,
                        checkpoint_io=checkpoint_io, rank_zero=rank_zero, mode=mode, stats=stats)


def _run_trainer(cfg, session: Session, *, module, datamodule, logger, tokenizer, checkpoint_io, rank_zero: bool,
                 mode: str, stats: dict) -> int:
    """Fit (or validate), audit the adapter when the dataset has canaries, then write the encrypted adapter (sealed
    to this release, and to the recipient unless a required audit failed), the recorded recipe and the summary; the
    MLflow run is closed by `finish`, after the receipt."""
    from medtee import containment
    from medtee.tracking.config import TrackingConfig
    from medtee.training.config import weights_label
    from medtee.training.engine import build_trainer
    from medtee.training.output import write_outputs

    t, out_dir = cfg.trainer, session.out_dir
    trainer = session.outcome.trainer = build_trainer(
        t, cfg.hardware, metrics=TrackingConfig.allowed_metrics(cfg.tracking), model=module.model, logger=logger,
        out_dir=out_dir, checkpoint_io=checkpoint_io)
    module.run_info = {"mlflow_run_id": logger.run_id} if logger else {}
    started = time.time()
    with containment.lightning_sigterm():
        if t.validate_only:  # an evaluation run: the held-out split only, no adapter
            trainer.validate(module, datamodule=datamodule, ckpt_path=t.resume_from, verbose=False)
        else:
            trainer.fit(module, datamodule=datamodule, ckpt_path=t.resume_from)
    # every process takes part: under FSDP this gathers the adapter's shards to rank 0 (the others get nothing)
    adapter = None if t.validate_only else module.adapter_state(trainer.strategy.lightning_module_state_dict())
    session.outcome.adapter_written = not t.validate_only  # every rank: the run made one (rank 0 writes it)
    if not rank_zero:
        return exits.OK
    metrics = session.outcome.metrics = logger.guard.metrics(
        {k: float(v) for k, v in trainer.callback_metrics.items() if k in FINAL_METRICS})
    seconds = round(time.time() - started, 1)
    audit = _audit(cfg, session, model=module.model, tokenizer=tokenizer, datamodule=datamodule, logger=logger,
                   step=trainer.global_step) if adapter is not None and session.canaries else None
    # with release.require_audit the adapter goes to the recipient only on a passed audit, never for want of one
    released = adapter is None or not cfg.release.require_audit or (audit is not None and audit.passed)
    summary = _summary(session, mode=mode, stats=stats, run_id=logger.run_id, resumed=bool(t.resume_from),
                       world_size=trainer.world_size, steps=trainer.global_step, seconds=seconds, metrics=metrics)
    if module.dp_summary():
        summary["privacy"] = {"dp": module.dp_summary()}
    if audit is not None:
        summary["audit"] = {**audit.to_json(), "required": cfg.release.require_audit, "adapter_released": released}
    written = write_outputs(module.model, adapter=adapter, recipient=session.keys.adapter_recipient(cfg) if released else None,
                            base_model=weights_label(cfg.model),
                            release_key=session.adapter_key, summary=summary, recorded_recipe=session.recorded,
                            out_dir=out_dir)

    def finish(receipt: dict | None) -> None:
        logger.finish(summary, recipe=session.recorded, verdict=session.verdict, weight_digests=session.weights,
                      receipt=receipt, evaluation={k: v for k, v in metrics.items() if k.startswith("val/")},
                      tags={"medtee.adapter_sha256": written["adapter_sha256"]} if written else None)
        _report(summary, first_loss=module.first_loss, out_dir=out_dir, written=written,
                recipient=cfg.output.recipient, tracking_uri=cfg.tracking.tracking_uri)
        if not released:
            why = "; ".join(audit.failures) if audit is not None else "the dataset's canary file holds no canaries"
            say(f"refused: the memorization audit failed, so the adapter stays sealed to the dataset's release "
                f"({out_dir / 'adapter.sealed'}) and is not encrypted to the recipient: {why}")

    session.outcome.finish = finish
    return exits.OK if released else exits.REFUSED


def _audit(cfg, session: Session, *, model, tokenizer, datamodule, logger, step: int):
    """The memorization audit (medtee.audit): its verdict; its aggregates logged through the guard and kept for the
    receipt."""
    from omegaconf import OmegaConf

    from medtee.audit.gate import run_audit

    say(f"auditing the adapter with {len(session.canaries)} canaries of the data owner")
    verdict = run_audit(model, tokenizer, session.canaries, datamodule.training_split(),
                        OmegaConf.to_object(cfg.release), seed=cfg.trainer.seed)
    guarded = logger.guard.metrics(verdict.metrics)
    logger.log_metrics(guarded, step=step)
    session.outcome.metrics = {**session.outcome.metrics, **guarded}  # the receipt's; the summary keeps them apart
    logger.set_tags({"medtee.audit.verdict": "pass" if verdict.passed else "fail"})
    say(f"memorization audit: {'PASS' if verdict.passed else 'FAIL'}"
        + "".join(f"; {f}" for f in verdict.failures))
    return verdict


def _held_out_and_adapter(cfg, session: Session):
    """(tokenizer, held-out split, the peft model with the sealed adapter loaded, device) of an evaluation run."""
    import torch

    from medtee.crypto.stream import StreamError
    from medtee.evaluation import compare
    from medtee.training.model import build_model, build_tokenizer
    from medtee.training.output import open_sealed_adapter

    e, hw = cfg.evaluation, cfg.hardware
    if hw.cpu_threads:
        torch.set_num_threads(hw.cpu_threads)
    device = "cuda" if hw.accelerator == "cuda" else "cpu"
    tokenizer = build_tokenizer(cfg.model)
    held_out = read_records(cfg, session, tokenizer).held_out()
    model = build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device=device)
    try:
        tensors = open_sealed_adapter(Path(e.adapter), session.adapter_key,
                                      sha256=_recorded_sha256(session, "evaluation", "adapter"),
                                      earlier=session.earlier_keys.get("adapter", ()))
    except StreamError:
        raise config.ConfigError(f"evaluation.adapter={e.adapter} does not open under this dataset's release: it "
                                 f"was sealed by a training run on another dataset, or by a medtee before 2026-12 "
                                 f"before `medtee keys rotate` of this dataset (its key derived from the manifest "
                                 f"digest, which the rotation changed), or "
                                 f"altered; evaluate it with the data.path it was trained on") from None
    compare.load_adapter(model, tensors)
    return tokenizer, held_out, model, device


def _generate(cfg, session: Session) -> int:
    """`medtee generate`: the rating packet of a blinded clinician study. For held-out dialogues, the context and
    both models' answers under labels A/B in a random order per item, encrypted to the study owner; the blinding
    sealed apart, to the custodian's key (`evaluation.blinding_recipient`) or else the study owner's. Nothing from it
    goes to MLflow; the receipt names both files."""
    import secrets

    from medtee.evaluation import compare, packet
    from medtee.evaluation.ratings import make_blinding, seal_blinding, study_item_ids

    e = cfg.evaluation
    tokenizer, held_out, model, device = _held_out_and_adapter(cfg, session)
    replies = [r for r in (compare.last_reply(ids, labels) for ids, labels in compare.examples(held_out)) if r]
    replies = replies[:e.max_items]
    answers = {side: compare.generate(model, replies, eos_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
                                      pad_id=tokenizer.pad_token_id, device=device, base=side == "base", cfg=e)
               for side in ("base", "tuned")}
    ids = study_item_ids(len(replies))
    blinding = make_blinding(ids, secrets.randbits(128))
    items = [{"item_id": item, "context": compare.readable(tokenizer, reply.prompt),
              "answers": {label: tokenizer.decode(answers[blinding[item][label]][i], skip_special_tokens=True)
                          for label in ("A", "B")}}
             for i, (item, reply) in enumerate(zip(ids, replies))]
    session.out_dir.mkdir(parents=True, exist_ok=True)
    keys = session.keys  # read before the digest, as it hashed them
    packet.seal_packet(items, (keys.study.scheme, keys.study.public), session.out_dir / packet.PACKET_FILE)
    custodian = keys.blinding or keys.study
    seal_blinding(blinding, (custodian.scheme, custodian.public), session.out_dir / packet.BLINDING_FILE)
    del items, answers, blinding

    def finish(receipt: dict | None) -> None:
        say(f"done: a rating packet of {len(ids)} held-out items, encrypted to {e.study_recipient}: "
            f"{session.out_dir / packet.PACKET_FILE}; the blinding, sealed apart to "
            f"{e.blinding_recipient or e.study_recipient}: {session.out_dir / packet.BLINDING_FILE}")
        who = "the custodian, given the ratings," if e.blinding_recipient else "after the ratings, the study owner"
        say(f"the study owner opens it with `medtee eval packet {session.out_dir / packet.PACKET_FILE} --key KEY "
            f"--out study/`; {who} runs `medtee eval ratings RATINGS.csv --blinding ... --key KEY`")

    session.outcome.finish = finish
    return exits.OK


def _evaluate(cfg, session: Session) -> int:
    """`medtee eval run`: the base model and the sealed adapter on the held-out dialogues, paired per dialogue;
    aggregates with 95% bootstrap intervals through the guard, and a self-contained HTML report."""
    from medtee.evaluation import compare
    from medtee.files import write_atomic
    from medtee.tracking.logger import open_run, run_tags

    e, hw = cfg.evaluation, cfg.hardware
    tokenizer, held_out, model, device = _held_out_and_adapter(cfg, session)
    aggregates = compare.paired_aggregates(compare.measure(model, tokenizer, held_out, e, device=device), e)
    tags = run_tags(recipe=session.recipe, recipe_digest=session.digest, verdict=session.verdict,
                    dataset_digest=session.dataset.manifest.digest(), hardware=hw.name, model=cfg.model, mode="eval",
                    weight_digests=session.weights)
    logger = session.outcome.logger = open_run(cfg.tracking, run_name=f"{session.recipe}-eval", tags=tags,
                                               params=session.recorded, eval_examples=len(held_out),
                                               manifest=session.dataset.manifest, context="evaluation")
    say(f"MLflow run {logger.run_id} in {logger.where}")
    metrics = session.outcome.metrics = logger.guard.metrics(aggregates)
    logger.log_metrics(metrics, step=0)
    report = compare.report(session.recipe, metrics, n=len(held_out))
    evaluation = {"examples": len(held_out), "metrics": metrics}
    write_atomic(session.out_dir / "evaluation.json", json.dumps(evaluation, indent=2, sort_keys=True).encode())
    write_atomic(session.out_dir / compare.REPORT_FILE, report)

    def finish(receipt: dict | None) -> None:
        logger.finish_evaluation(evaluation, report=report, receipt=receipt)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_delta"))
        say(f"done: evaluated {len(held_out)} held-out dialogues; {shown or 'no metric aggregated enough examples'}")
        say(f"report: {session.out_dir / compare.REPORT_FILE}")

    session.outcome.finish = finish
    return exits.OK


def _sweep(cfg, session: Session) -> int:
    """`medtee sweep`: the trials of the recipe's sweep, each an ordinary training run composed from the recipe and
    the trial's overrides, all served by this process's one attestation and key release: the records are decrypted
    once and kept in memory (never on disk) for every trial; each trial builds a fresh model."""
    import dataclasses
    import os
    import re
    import socket

    from hydra.core.hydra_config import HydraConfig

    from medtee.sweep.config import default_storage, from_section
    from medtee.sweep.engine import run_sweep
    from medtee.sweep.tracking import SweepTracker
    from medtee.tracking.guard import Guard
    from medtee.tracking.logger import SWEEP_TAGS, run_tags

    space = from_section(cfg.sweep)
    records = list(session.records())  # decrypted once, in memory only, for every trial
    session.teardown.dropped("decrypted records of the sweep", f"{len(records)} records held as Python strings "
                                                               f"between trials: dropped, not overwritable")
    session.teardown.wipe("data key")
    d, t = cfg.data, cfg.trainer
    guard = Guard(cfg.tracking.metrics, cfg.tracking.min_aggregate)
    guard.eval_examples = min(round(d.val_fraction * len(records)), t.limit_val_batches * d.batch_size)
    tags = run_tags(recipe=session.recipe, recipe_digest=session.digest, verdict=session.verdict,
                    dataset_digest=session.dataset.manifest.digest(), hardware=cfg.hardware.name, model=cfg.model,
                    mode="sweep", weight_digests=session.weights)
    tracker = SweepTracker(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment, guard=guard,
                           tags={k: v for k, v in tags.items() if k in SWEEP_TAGS})
    task = list(HydraConfig.get().overrides.task)

    class Trials:
        def run(self, overrides: list[str], trial_number: int) -> dict[str, float]:
            swept = {o.partition("=")[0] for o in overrides}
            base = [o for o in task if o.partition("=")[0] not in swept]
            trial_cfg = config.compose(base + overrides)  # every value passes the recipe guard and the schemas
            config.apply_environment(trial_cfg)
            trial = dataclasses.replace(
                session, recipe=f"{session.recipe}-trial-{trial_number}", outcome=Outcome(), records=records,
                # a trial's label: the sweep's own digest is the one attested (trials use the keys it read)
                digest=config.recipe_digest(trial_cfg, weights=session.weights or None, mode="sweep",
                                            files=session.keys.files(trial_cfg)),
                recorded=config.digest_input(config.resolved(trial_cfg), weights=session.weights or None,
                                             mode="sweep", files=session.keys.files(trial_cfg)),
                out_dir=session.out_dir / f"trial-{trial_number:04d}", mlflow_run_id=tracker.run_id_of(trial_number))
            moved = sorted(set(differing(trial.recorded, session.recorded)) - swept)
            if moved:  # the release was checked on the sweep's recipe: a trial may change only what it sweeps
                say(f"refused: trial {trial_number} would change {', '.join(moved)}, which the sweep does not sweep, "
                    f"from the recipe the key was released for")  # (the study stores the exception's type only)
                raise config.ConfigError(f"trial {trial_number} changes {', '.join(moved)}")
            try:
                _fit(trial_cfg, trial)
            finally:  # what the sweep's close reports it left: any trial's adapter, the newest checkpoint
                session.outcome.adapter_written |= trial.outcome.adapter_written
                if getattr(trial.outcome.checkpoints, "last_written", None):
                    session.outcome.checkpoints, session.outcome.trainer = trial.outcome.checkpoints, trial.outcome.trainer
            trial.outcome.finish(None)  # the trial's child run: its summary and recipe; the tracker records the state
            return trial.outcome.metrics

    worker = space.worker or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:64]
    try:
        result = run_sweep(space, Trials(), storage_url=space.storage or default_storage(cfg.tracking.tracking_uri),
                           worker_id=worker, guard=guard, tracker=tracker)
    finally:
        records.clear()
    if result.best_value is not None:
        session.outcome.metrics = {space.objective: float(result.best_value)}

    def finish(receipt: dict | None) -> None:
        say(f"sweep {space.name}: {result.complete} complete, {result.failed} failed trials ({result.stopped}); best "
            f"trial {result.best_trial}: {space.objective} {result.best_value} with {' '.join(result.best_overrides)}")

    session.outcome.finish = finish
    return exits.OK if result.done else exits.FAILED


def _end(cfg, *, outcome: Outcome, error, teardown, broker, attested, signer, started, recorded, digest, weights,
         dataset, out_dir: Path) -> None:
    """Success or failure, once a data key was released: destroy what held keys and records, tell the broker the
    release is closed, sign the receipt, close the MLflow run, say what was done."""
    from lightning.pytorch.utilities import rank_zero_only

    from medtee.receipt.signing import write_receipt
    from medtee.files import sha256_file
    from medtee.receipt.statement import build_statement

    record = {**teardown.destroy(), "outputs": outcome.outputs()}
    say(f"teardown: {teardown.summary()}")
    release = attested.release
    try:
        closed = broker.close_release(release.release_id, record=record, receipt_public_key=signer.public_bytes,
                                      signature=signer.sign_close(release.release_id, record))
        say(f"key release {release.release_id[:16]} closed at the key broker")
    except Exception as exc:  # the run's result stands; the receipt says the close is not on the broker's record
        closed = None
        say(f"warning: the key broker did not record the release closed ({type(exc).__name__}); the receipt says so")
    envelope = None
    try:
        statement = build_statement(
            recipe=recorded, recipe_digest=digest, model_revision=cfg.model.revision, weight_digests=weights,
            dataset_id=dataset.manifest.dataset_id, manifest_digest=dataset.manifest.digest(),
            evidence=attested.evidence, policy=attested.policy, verdict=attested.verdict, release=release,
            receipt_public_key=signer.public_bytes, started=started, ended=datetime.now(timezone.utc),
            metrics=outcome.metrics, teardown=record, error=error,
            subjects={str(p.relative_to(out_dir)): sha256_file(p) for p in _output_files(out_dir)},
            close_audit_entry_sha256=closed)
        envelope = signer.sign(statement)
        rank = rank_zero_only.rank
        path = write_receipt(envelope, out_dir, name="receipt.dsse.json" if rank == 0 else f"receipt.rank{rank}.dsse.json")
        say(f"receipt: {path} (signed by the attested process; check it offline: `medtee receipt verify {path}`)")
    except Exception as exc:
        if error is None:
            if outcome.logger:
                outcome.logger.fail(None)  # never left RUNNING
            raise
        say(f"warning: no receipt written ({type(exc).__name__})")  # the run's own failure is what is reported
    if error is not None:
        if outcome.logger:
            with contextlib.suppress(Exception):  # the run's own failure is what is reported, not the tracker's
                outcome.logger.fail(envelope)
    elif outcome.finish:
        outcome.finish(envelope)


def _output_files(out_dir: Path) -> list[Path]:
    """The run's output files (the receipt's subjects): all but the synthetic dataset sealed for the demo."""
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and SYNTHETIC_DIR not in p.relative_to(out_dir).parts
                  and not p.name.startswith("receipt."))


def _summary(session: Session, *, mode: str, stats: dict, run_id: str, resumed: bool, world_size: int, steps: int,
             seconds: float, metrics: dict) -> dict:
    """summary.json: what ran on which data (ids and digests), the attestation outcome, counts, aggregate metrics."""
    manifest, verdict = session.dataset.manifest, session.verdict
    return {
        "recipe": session.recipe,
        "recipe_digest": session.digest,
        "dataset": {"id": manifest.dataset_id, "manifest_digest": manifest.digest()},
        "attestation": {"policy": verdict.policy, "ok": verdict.ok, "simulated": verdict.simulated},
        "examples": {"train": stats.get("n_train"), "val": stats.get("n_val")},
        "mlflow_run_id": run_id,
        "mode": mode,
        "resumed": resumed,
        "world_size": world_size,
        "steps": steps,
        "seconds": seconds,
        "final_metrics": metrics,
    }


def _report(summary: dict, *, first_loss: float | None, out_dir: Path, written: dict, recipient: str,
            tracking_uri: str) -> None:
    """The run's last lines: what was learned, where the outputs are, how to look at the metrics."""
    from medtee.tracking.logger import display_uri

    metrics = summary["final_metrics"]
    shown = [f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val/")]
    if "train/loss" in metrics:
        shown.insert(0, f"train/loss {first_loss:.3f} -> {metrics['train/loss']:.3f}" if first_loss is not None
                     else f"train/loss {metrics['train/loss']:.3f}")
    what = "validation" if summary["mode"] == "validate" else f"{summary['steps']} steps"
    say(f"done: {what} in {summary['seconds']} s; {', '.join(shown) or 'no metric aggregated enough examples'}")
    if written:
        from medtee.training.output import ADAPTER_FILE, DEV_RECIPIENT_DIR, DEV_RECIPIENT_NAME

        key = DEV_RECIPIENT_DIR / f"{DEV_RECIPIENT_NAME}.key" if recipient == "dev" else "<the recipient's .key>"
        say(f"encrypted adapter (to {written['adapter_recipient']}): open it with "
            f"`medtee adapter open {out_dir / ADAPTER_FILE} --key {key} --out adapter/`")
    dashboard = (f"mlflow ui --backend-store-uri {tracking_uri}   (then browse http://127.0.0.1:5000)"
                 if tracking_uri.startswith("sqlite:") else display_uri(tracking_uri))
    say(f"summary: {out_dir / 'summary.json'}; dashboard: {dashboard}")
