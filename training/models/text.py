"""The frozen CLIP text encoder of the diffusion model: per-token hidden states of an open_clip text tower.

Stable Diffusion 1.x conditions its U-Net on the last hidden states of CLIP's text transformer (after the final
layer norm, before pooling and projection): one vector per token position, ``(context_length, width)`` per
caption. :func:`token_states` computes exactly that for an open_clip ``CLIP`` model, so the encoder can be any
model the CLIP scorer loads: an open_clip name + pretrained tag, a checkpoint file, or a directory our CLIP
trainer exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.curate.scorer import load_scorer


def token_states(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token hidden states ``(n, context_length, width)`` of an open_clip CLIP text tower for token ids."""
    model = getattr(model, "module", model)
    if not hasattr(model, "token_embedding"):
        raise ValueError(
            f"{type(model).__name__}: only open_clip CLIP models with a built-in text tower are supported"
        )
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@dataclass
class TextEncoder:
    """A frozen open_clip text tower with its tokenizer; :meth:`encode` gives per-token hidden states."""

    model: torch.nn.Module
    tokenizer: object  # list[str] -> (n, context_length) token ids
    device: torch.device
    provenance: dict  # model id, pretrained tag or path, weights sha256: recorded in manifests and model folders

    @property
    def context_length(self) -> int:
        """Tokens per caption."""
        return int(self.model.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """Hidden size per token (the U-Net's ``cross_attention_dim``)."""
        return int(self.model.positional_embedding.shape[1])

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """``(len(texts), context_length, width)`` float32 hidden states on the encoder's device."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(token_states(self.model, tokens).float())
        if not out:
            return torch.zeros(0, self.context_length, self.width, device=self.device)
        return torch.cat(out)

    def empty(self) -> torch.Tensor:
        """The embedding of the empty prompt ``""`` (``(context_length, width)``): what CFG dropout swaps in."""
        return self.encode([""])[0]


def load_text_encoder(model: str, pretrained: str | None = None, device: str = "auto") -> TextEncoder:
    """Load the text tower of an open_clip model (name + tag, name + file, or exported dir), frozen, in eval mode.

    Raises ``ValueError`` with one line when the model cannot be loaded.
    """
    scorer = load_scorer(model, pretrained, device=device)
    net = scorer.model.eval().requires_grad_(False)
    if hasattr(net, "visual"):
        net.visual = None  # the image tower is not needed; free its memory
    provenance = {"model": scorer.model_id, "pretrained": scorer.pretrained, "sha256": scorer.checkpoint_sha256}
    return TextEncoder(model=net, tokenizer=scorer.tokenizer, device=scorer.device, provenance=provenance)


def check_text_encoder(te_model: str, te_pretrained: str | None) -> None:
    """Load the text encoder the pipeline folder will copy: a bad reference is a one-line ``ValueError`` before
    training, not after the last step."""
    try:
        load_text_encoder(te_model, te_pretrained, device="cpu")
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load the text encoder {te_model!r}: {str(e).strip().splitlines()[0]}") from None


TEXT_STATE_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final")  # what token_states reads


def trainable_text_tower(model: torch.nn.Module, embeddings: bool = False) -> torch.nn.Module:
    """``model`` (an open_clip CLIP whose image tower may be gone) in train mode, with only the parts that make the
    per-token states trainable: DDP needs every trainable parameter to get a gradient, and the pooled projection
    and the logit scale get none.

    The token embedding table stays frozen unless ``embeddings``: it is nearly all of a small tower's weights
    (49,408 x width), its gradient is dense although a batch uses a few hundred rows, and every step would pay for
    it in the optimizer, the EMA and the gradient all-reduce. The layers above it still learn how to tell the
    tokens apart."""
    model.train()
    parts = set(TEXT_STATE_PARTS) - (set() if embeddings else {"token_embedding"})
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] in parts)
    return model


class TextTunedUNet(torch.nn.Module):
    """The U-Net behind a trainable text tower (``--train-text-encoder``): tokens in, the U-Net's output out."""

    def __init__(self, unet: torch.nn.Module, text: torch.nn.Module):
        super().__init__()
        self.unet, self.text = unet, text

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor):
        return self.unet(noisy, t, encoder_hidden_states=token_states(self.text, tokens))
