"""A slow, obviously correct IVT-LR reference on the transformers PyTorch models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Chameleon).

For every latent step it re-runs the whole growing sequence from position 0 with eager attention,
averages the attention maps over layers and heads, takes the top-k image tokens not used yet, and
puts V_t and h in before the latent slot; positions are renumbered over the final sequence.
`reference_greedy` is the generation reference on our own model: one full forward per new token.
"""

import numpy as np
import torch


def _is_chameleon(hf) -> bool:
    return hf.config.model_type == "chameleon"


def _positions(hf, ids_prefix, mask_prefix, grid, valid, mode):
    """Positions for the sequence built so far (prefix + whatever follows it): (3, B, L) or (B, L)."""
    if mode == "sequential":
        pos = (np.cumsum(valid, 1) - 1).clip(0)
        if _is_chameleon(hf):
            return torch.tensor(pos).long()
        return torch.tensor(np.broadcast_to(pos[None], (3,) + pos.shape).copy()).long()
    mm = torch.tensor((ids_prefix == hf.config.image_token_id).astype(np.int64))
    pre, _ = hf.model.get_rope_index(torch.tensor(ids_prefix), mm, image_grid_thw=torch.tensor(grid),
                                     attention_mask=torch.tensor(mask_prefix))
    pre = pre.numpy()
    p = ids_prefix.shape[1]
    out = np.zeros((3,) + valid.shape, np.int64)
    out[:, :, :p] = pre
    for b in range(valid.shape[0]):
        start = pre[:, b][:, mask_prefix[b].astype(bool)].max() + 1
        out[:, b, p:] = (np.cumsum(valid[b, p:]) - 1).clip(0) + start
    return torch.tensor(out)


def _embed(hf, ids, pv, grid):
    """Token embeddings with the image tokens replaced by the image features (transformers' own functions)."""
    ids_t = torch.tensor(ids)
    emb = hf.model.get_input_embeddings()(ids_t)
    if pv is None:
        return emb
    if _is_chameleon(hf):
        feats = hf.model.get_image_features(torch.tensor(pv)).pooler_output.reshape(-1, emb.shape[-1])
    else:
        feats = torch.cat(hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid)).pooler_output)
    img_mask = (ids_t == hf.config.image_token_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(img_mask, feats.to(emb.dtype))


def _deepstack(hf, pv, grid):
    """Qwen3-VL: the DeepStack features of every image token in order (one (N, H) tensor per layer); else None."""
    if hf.config.model_type != "qwen3_vl" or pv is None:
        return None
    with torch.no_grad():
        return [torch.cat(f) for f in hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid))
                .deepstack_features]


def _deepstack_kwargs(deep, places, bsz, length):
    """transformers' DeepStack inputs for a sequence: places[b] lists (sequence index, feature row) pairs."""
    if deep is None:
        return {}
    mask, rows = np.zeros((bsz, length), bool), []
    for b in range(bsz):
        for at, row in sorted(places[b]):
            mask[b, at] = True
            rows.append(row)
    return {"visual_pos_masks": torch.tensor(mask), "deepstack_visual_embeds": [f[rows] for f in deep]}


def _decoder(hf):
    return hf.model if _is_chameleon(hf) else hf.model.language_model


def _logits(hf, hidden):
    logits = hf.lm_head(hidden).float()
    if _is_chameleon(hf):  # image-token columns at the minimum, as ChameleonForConditionalGeneration does
        logits[:, :, hf.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
    return logits


def oracle_latent_forward(hf, latent_id, ids, mask, labels, pv, grid, k, latent_text=True,
                          position_mode="sequential", selection_order="position", deepstack_latent=True):
    """Returns (loss, logits (B, L_final, V), selected (n, B, k), valid (B, L_final)).

    Qwen3-VL: the prompt's image tokens get their DeepStack features in the first decoder layers, and with
    deepstack_latent so does every re-fed image token at its place in the chunk."""
    lm = _decoder(hf)
    with torch.no_grad():
        emb = _embed(hf, ids, pv, grid)
    lat = ids == latent_id
    n = int(lat[0].sum())
    p = int(lat[0].argmax()) if n else ids.shape[1]
    bsz = ids.shape[0]
    image_lists = [np.nonzero((ids[b, :p] == hf.config.image_token_id) & (mask[b, :p] > 0))[0] for b in range(bsz)]
    used = [set() for _ in range(bsz)]
    deep = _deepstack(hf, pv, grid)
    first = np.cumsum([0] + [len(x) for x in image_lists])  # row b's image tokens are feature rows first[b] + j
    places = [[(int(at), int(first[b] + j)) for j, at in enumerate(image_lists[b])] for b in range(bsz)]
    seq, valid = emb[:, :p], mask[:, :p].copy()
    selected = []
    for _ in range(n):
        pos = _positions(hf, ids[:, :p], mask[:, :p], grid, valid, position_mode)
        with torch.no_grad():
            out = lm(inputs_embeds=seq, attention_mask=torch.tensor(valid), position_ids=pos,
                     output_attentions=True, **_deepstack_kwargs(deep, places, bsz, seq.shape[1]))
        h = out.last_hidden_state[:, -1:]
        attn = torch.stack(out.attentions).mean((0, 2))[:, -1, :].numpy()  # (B, len)
        chunks, step_sel = [], []
        for b in range(bsz):
            cand = [(j, attn[b, pos_j]) for j, pos_j in enumerate(image_lists[b]) if j not in used[b]]
            cand.sort(key=lambda c: (-c[1], c[0]))  # highest score first, ties: lower position
            pick = [j for j, _ in cand[:k]]
            used[b].update(pick)
            if selection_order == "position":
                pick = sorted(pick)
            step_sel.append(pick)
            if deepstack_latent:
                places[b] += [(seq.shape[1] + i, int(first[b] + j)) for i, j in enumerate(pick)]
            parts = [emb[b : b + 1, image_lists[b][pick]]] if k else []
            if latent_text:
                parts.append(h[b : b + 1])
            chunks.append(torch.cat(parts, 1))
        selected.append(step_sel)
        seq = torch.cat([seq, torch.cat(chunks, 0)], 1)
        valid = np.concatenate([valid, np.ones((bsz, chunks[0].shape[1]), valid.dtype)], 1)
    seq = torch.cat([seq, emb[:, p + n :]], 1)
    valid = np.concatenate([valid, mask[:, p + n :]], 1)
    pos = _positions(hf, ids[:, :p], mask[:, :p], grid, valid, position_mode)
    with torch.no_grad():
        out = lm(inputs_embeds=seq, attention_mask=torch.tensor(valid), position_ids=pos,
                 **_deepstack_kwargs(deep, places, bsz, seq.shape[1]))
        logits = _logits(hf, out.last_hidden_state)
    c = seq.shape[1] - ids.shape[1] + n
    lab = np.concatenate([labels[:, :p], np.full((bsz, c), -100), labels[:, p + n :]], 1)
    lab = np.where(valid > 0, lab, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(lab[:, 1:]).reshape(-1).long(), ignore_index=-100)
    sel = np.array(selected, dtype=np.int64).reshape(n, bsz, k)
    return float(loss), logits.numpy(), sel, valid.astype(bool)


def reference_greedy(m, n, ids, mask, pv, grid, steps, k, mode):
    """Greedy decoding by one full forward over the whole final sequence per new token (no generation cache).

    The sequence has a fixed width (generated tokens so far, right pads after them) so it compiles once;
    causal attention keeps the pads from touching the logits read at the last real token.
    """
    b, s = ids.shape
    out = np.zeros((b, steps), np.int64)
    for t in range(steps):
        cur = np.concatenate([ids, out], 1)
        cur_mask = np.concatenate([mask, np.zeros((b, steps), mask.dtype)], 1)
        cur_mask[:, s : s + t] = 1
        if n:
            logits = m.latent_forward(cur, cur_mask, None, pv, grid, k=k, position_mode=mode).logits
        else:
            logits = m.logits(cur, cur_mask, pv, grid, position_mode=mode)
        last = logits.shape[1] - steps - 1 + t  # the last real token of the final sequence
        out[:, t] = logits[:, last].argmax(-1)
    return out
