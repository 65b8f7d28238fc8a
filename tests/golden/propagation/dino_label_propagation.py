# Reference for src/eval/label_propagation.rs (test `matches_dino_reference`): the functions of
# dino/eval_video_segmentation.py (label_propagation, restrict_neighborhood, norm_mask, to_one_hot and
# the loop of eval_video_tracking_davis), verbatim, on CPU with tiny deterministic inputs.
# Run: python3 dino_label_propagation.py  (torch 2.15, numpy 2.4, Pillow 13 were used).

import queue, copy, numpy as np, torch, torch.nn.functional as F
from PIL import Image
class A: pass
args = A(); args.n_last_frames = 2; args.size_mask_neighborhood = 1; args.topk = 3; args.patch_size = 2
h, w, D, T, C = 3, 4, 4, 5, 3
feats = []
for t in range(T):
    f = np.array([[np.sin(0.37*t + 1.1*i + 0.83*d + 0.1*i*d) for d in range(D)] for i in range(h*w)])
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    feats.append(torch.tensor(f, dtype=torch.float32))
small = np.array([[0,1,1,0],[2,2,0,1],[0,0,2,1]], dtype=np.float32)
def to_one_hot(y_tensor, n_dims=None):
    if(n_dims is None):
        n_dims = int(y_tensor.max()+ 1)
    _,h,w = y_tensor.size()
    y_tensor = y_tensor.type(torch.LongTensor).view(-1, 1)
    y_one_hot = torch.zeros(y_tensor.size()[0], n_dims).scatter_(1, y_tensor, 1)
    y_one_hot = y_one_hot.view(h,w,n_dims)
    return y_one_hot.permute(2, 0, 1).unsqueeze(0)
first_seg = to_one_hot(torch.from_numpy(small).unsqueeze(0))
def restrict_neighborhood(h, w):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * args.size_mask_neighborhood + 1):
                for q in range(2 * args.size_mask_neighborhood + 1):
                    if i - args.size_mask_neighborhood + p < 0 or i - args.size_mask_neighborhood + p >= h:
                        continue
                    if j - args.size_mask_neighborhood + q < 0 or j - args.size_mask_neighborhood + q >= w:
                        continue
                    mask[i, j, i - args.size_mask_neighborhood + p, j - args.size_mask_neighborhood + q] = 1
    return mask.reshape(h * w, h * w)
def norm_mask(mask):
    c, h, w = mask.size()
    for cnt in range(c):
        mask_cnt = mask[cnt,:,:]
        if(mask_cnt.max() > 0):
            mask_cnt = (mask_cnt - mask_cnt.min())
            mask_cnt = mask_cnt/mask_cnt.max()
            mask[cnt,:,:] = mask_cnt
    return mask
def label_propagation(feat_tar, list_frame_feats, list_segs, mask_neighborhood=None):
    return_feat_tar = feat_tar.T
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if args.size_mask_neighborhood > 0:
        if mask_neighborhood is None:
            mask_neighborhood = restrict_neighborhood(h, w)
            mask_neighborhood = mask_neighborhood.unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=args.topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, hh, ww = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    seg_tar = torch.mm(segs, aff)
    seg_tar = seg_tar.reshape(1, C, hh, ww)
    return seg_tar, return_feat_tar, mask_neighborhood
que = queue.Queue(args.n_last_frames)
frame1_feat = feats[0].T
mask_neighborhood = None
ori_h, ori_w = 7, 9
soft_out, seg_out = [], []
for cnt in range(1, T):
    used_frame_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
    used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
    frame_tar_avg, feat_tar, mask_neighborhood = label_propagation(feats[cnt], used_frame_feats, used_segs, mask_neighborhood)
    if que.qsize() == args.n_last_frames:
        que.get()
    seg = copy.deepcopy(frame_tar_avg)
    que.put([feat_tar, seg])
    soft_out.append(frame_tar_avg.flatten().tolist())
    frame_tar_avg = F.interpolate(frame_tar_avg, scale_factor=args.patch_size, mode='bilinear', align_corners=False, recompute_scale_factor=False)[0]
    frame_tar_avg = norm_mask(frame_tar_avg)
    _, frame_tar_seg = torch.max(frame_tar_avg, dim=0)
    frame_tar_seg = np.array(frame_tar_seg.squeeze().cpu(), dtype=np.uint8)
    frame_tar_seg = np.array(Image.fromarray(frame_tar_seg).resize((ori_w, ori_h), 0))
    seg_out.append(frame_tar_seg.flatten().tolist())
print("SOFT", [[round(v, 7) for v in s] for s in soft_out])
print("SEG", seg_out)
