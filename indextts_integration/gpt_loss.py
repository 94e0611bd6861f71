"""UnifiedVoice's training objective, which upstream does not ship: masked text + mel cross-entropy.

Trap: `UnifiedVoice.forward` returns mel *latents* (get_logits with return_latent=True), not logits or a loss.
We build the same sequence forward() builds and call `get_logits` for real logits:
    [32 speaker latents + emo vector, speed embs (2)] + [start_text, text..., stop_text] + [start_mel, codes..., stop_mel]
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass
class GPTBatch:
    """Padded tensors of one batch; lengths exclude padding."""

    conditioning: Tensor  # [B, 32, D] speaker latents (get_conditioning of the prompt), or a learned latent
    emo_vec: Tensor  # [B, D] emotion vector (emo_layer(emovec_layer(get_emo_conditioning(...))))
    text_ids: Tensor  # [B, Lt] long
    text_lengths: Tensor  # [B] long
    codes: Tensor  # [B, Lm] long semantic codes (50 Hz)
    code_lengths: Tensor  # [B] long

    def to(self, device: torch.device | str) -> "GPTBatch":
        return GPTBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


@dataclasses.dataclass
class GPTOutput:
    loss: Tensor
    text_loss: Tensor
    mel_loss: Tensor
    mel_correct: Tensor  # number of mel targets predicted right (argmax)
    mel_count: Tensor  # number of mel targets


def _aligned(model: nn.Module, ids: Tensor, lengths: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs and targets as forward() builds them, plus the mask of targets that count (tokens + first stop)."""
    ids = ids.clone()  # upstream's set_*_padding writes into its argument
    positions = torch.arange(ids.shape[1], device=ids.device)
    ids[positions[None, :] >= lengths[:, None]] = stop
    ids = F.pad(ids, (0, 1), value=stop)
    inputs, targets = model.build_aligned_inputs_and_targets(ids, start, stop)
    mask = torch.arange(targets.shape[1], device=ids.device)[None, :] <= lengths[:, None]
    return inputs, targets, mask


def gpt_forward(model: nn.Module, batch: GPTBatch, text_weight: float = 0.2, mel_weight: float = 0.8,
                pad_to_multiple: int = 0) -> GPTOutput:
    """Loss = text_weight * CE(text) + mel_weight * CE(mel), each averaged over its real (unpadded) targets.

    pad_to_multiple: widen the mel codes with masked padding so that the whole sequence length is a multiple of
    this. The padding comes last and attention is causal, so no real position sees it: the loss is unchanged. It
    makes batches of different lengths share shapes (see training.py, `pad_to_multiple`)."""
    B = batch.text_ids.shape[0]
    if pad_to_multiple > 1:
        batch = _pad_codes(model, batch, pad_to_multiple)
    # Trap: use_speed must be a LongTensor (it indexes speed_emb); 0 = normal speed, as forward() uses it.
    speed = torch.zeros(B, dtype=torch.long, device=batch.text_ids.device)
    conds = torch.cat((batch.conditioning + batch.emo_vec.unsqueeze(1),
                       model.speed_emb(torch.ones_like(speed)).unsqueeze(1),
                       model.speed_emb(speed).unsqueeze(1)), dim=1)
    text_in, text_tgt, text_mask = _aligned(model, batch.text_ids, batch.text_lengths,
                                            model.start_text_token, model.stop_text_token)
    mel_in, mel_tgt, mel_mask = _aligned(model, batch.codes, batch.code_lengths,
                                         model.start_mel_token, model.stop_mel_token)
    text_emb = model.text_embedding(text_in) + model.text_pos_embedding(text_in)
    mel_emb = model.mel_embedding(mel_in) + model.mel_pos_embedding(mel_in)
    text_logits, mel_logits = model.get_logits(conds, text_emb, model.text_head, mel_emb, model.mel_head)
    text_ce = F.cross_entropy(text_logits.float(), text_tgt, reduction="none")  # logits are [B, V, L]
    mel_ce = F.cross_entropy(mel_logits.float(), mel_tgt, reduction="none")
    text_loss = (text_ce * text_mask).sum() / text_mask.sum()
    mel_loss = (mel_ce * mel_mask).sum() / mel_mask.sum()
    correct = ((mel_logits.argmax(1) == mel_tgt) & mel_mask).sum()
    return GPTOutput(text_weight * text_loss + mel_weight * mel_loss, text_loss.detach(), mel_loss.detach(),
                     correct, mel_mask.sum())


def _pad_codes(model: nn.Module, batch: GPTBatch, multiple: int) -> GPTBatch:
    """Codes widened so that (latents + 2 speed) + (text + 2) + (codes + 2) positions, the sequence gpt_forward builds,
    are a multiple of `multiple`; left as they are where that would pass the mel position table (max_mel_tokens)."""
    length = batch.conditioning.shape[1] + 2 + batch.text_ids.shape[1] + 2 + batch.codes.shape[1] + 2
    extra = -length % multiple
    if extra == 0 or batch.codes.shape[1] + extra > model.max_mel_tokens:
        return batch
    return dataclasses.replace(batch, codes=F.pad(batch.codes, (0, extra), value=model.stop_mel_token))


def fix_gradient_checkpointing(model: nn.Module, enabled: bool = False) -> None:
    """Trap: UnifiedVoice(checkpointing=True), the constructor default, turns on *reentrant* gradient
    checkpointing in its GPT2Model. Reentrant checkpointing only back-propagates into a block when the block's
    inputs require grad; with a frozen base they do not, so LoRA weights inside get no gradient at all.
    We switch it off, or back on in the non-reentrant form that does propagate to parameters."""
    gpt = model.gpt
    gpt.gradient_checkpointing_disable()
    if enabled:
        gpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_gpt_dropout(model: nn.Module, p: float) -> None:
    """Trap: GPT2's resid/embd/attn dropout is 0.1 and active in train(); LoRA runs usually want it lower."""
    for module in model.gpt.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
        setattr(model.gpt.config, name, p)
    for block in model.gpt.h:  # sdpa attention reads the rate from this attribute, not from an nn.Dropout
        if hasattr(block.attn, "attn_dropout"):
            block.attn.attn_dropout.p = p
