"""A run's latent cache, from first use to the freed VAE: ``LatentFeed`` drives ``LatentCache`` for the loop.

Each image is encoded when a batch first needs it, so the first step comes after its own batch
is encoded, not after the whole dataset; once every image was used (or everything was on disk)
the totals are logged and the VAE is freed, which only sampling needs from then on.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

from trainer.data.latent_cache import CacheSpec, LatentCache, latent_caching_blockers

Log = Callable[..., None]


class LatentFeed:
    def __init__(self, settings: Any, family: Any, entries: list, seed: int, log: Log) -> None:
        self.family, self.log = family, log
        self.cache: LatentCache | None = None
        self._encoding_seen = 0.0  # the cache's encoding seconds at the last step
        if not (settings.cache_latents or settings.cache_latents_to_disk):
            return
        blockers = latent_caching_blockers(settings)
        if blockers:
            log("latents are not cached: " + "; ".join(blockers), "warning")
            return
        self.cache = LatentCache(CacheSpec(
            encode=family.encode_images, seed=seed, to_disk=bool(settings.cache_latents_to_disk),
            flip=bool(settings.flip_aug), batch_size=max(1, int(settings.vae_batch_size or 1)),
            suffix=family.cache_suffix, fingerprint=family.fingerprint(),
            trust_disk=bool(getattr(settings, "skip_cache_check", False)),
        ))
        report = self.cache.prepare(entries, self._progress_logger())
        if report.pending:
            log(f"latents are encoded as each image is first used ({report.pending} to encode, {report.reused} "
                "read from disk), so the steps of the first epoch are slower")
        else:  # everything was on disk
            self.finish()

    def _progress_logger(self) -> Callable[[int, int], None]:
        shown = [-1]

        def progress(done: int, total: int) -> None:  # a Log line per 10% for big datasets (from any thread)
            tenth = done * 10 // max(1, total)
            if tenth > shown[0] and total >= 20:
                shown[0] = tenth
                self.log(f"caching latents: {done}/{total}")

        return progress

    def vae_guard(self):
        """Held around an optimizer step: a data worker may encode latents with the VAE, not while a
        step's sampling uses it too."""
        return self.cache.exclusive() if self.cache is not None else nullcontext()

    def finish(self) -> None:
        """Once: encode what is still missing (after a resume the first epoch skipped some batches; normally
        nothing), say the totals and free the VAE."""
        if self.cache is None or self.cache.finished:
            return
        report = self.cache.finish()
        self.log(f"latents cached: {report.encoded} encoded, {report.reused} read from disk")
        self.family.release_vae()

    def encoding_time(self) -> tuple[float, float]:
        """(seconds spent encoding latents since the last call, estimated seconds still to encode): epoch 1's
        steps encode images on first use; the speed and ETA shown should not count that twice."""
        if self.cache is None:
            return 0.0, 0.0
        report = self.cache.report
        since, self._encoding_seen = report.seconds - self._encoding_seen, report.seconds
        return since, report.seconds_left()
