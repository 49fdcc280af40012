"""The warp engine's per-pixel loops, compiled (numba): the piecewise-affine backward map of a
moved triangulation, and the composite of the warped person over its background plate.

OpenCV fills a convex polygon in one colour, which is why the warp used to draw triangle ids
(~1200 `cv2.fillConvexPoly` calls a frame, a few microseconds each) and then look each pixel's
affine up in numpy. Here each triangle's rows are scanned once, in drawing order, writing the
source coordinate of every pixel it covers directly: no ids, no per-pixel gather, and cheap
enough to do at full resolution everywhere (no coarse grid to upsample, no jagged steps where
a map interpolated between triangles would bend a lip line).

Compiled once per machine (numba's cache) with explicit signatures, at import: the first frame
never waits for a compiler.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_EPS = 1e-7  # how far (in pixels) outside a triangle a pixel centre may lie and still be in it


@numba.njit("void(float64[:, :, ::1], float64[:, :, ::1], int64[::1], float64, float64, float64, "
            "float32[:, ::1], float32[:, ::1])", cache=True, nogil=True)
def backward_map(dst, src, order, x0, y0, step, map_x, map_y):
    """Fill map_x, map_y (H, W) with where each sample comes from in the source.

    dst, src: (T, 3, 2) the triangles where they are now and where they come from; order: the
    triangles to draw, first to last (a later one covers an earlier one where they overlap).
    Sample (r, c) lies at x0 + (c + 0.5) * step - 0.5, y0 + (r + 0.5) * step - 0.5 (step 1:
    output pixel x0 + c, y0 + r). A sample no triangle covers maps to itself.
    """
    h, w = map_x.shape
    for r in range(h):
        y = y0 + (r + 0.5) * step - 0.5
        for c in range(w):
            map_x[r, c] = x0 + (c + 0.5) * step - 0.5
            map_y[r, c] = y
    for k in range(order.shape[0]):
        t = order[k]
        ax, ay = dst[t, 0, 0], dst[t, 0, 1]
        e1x, e1y = dst[t, 1, 0] - ax, dst[t, 1, 1] - ay
        e2x, e2y = dst[t, 2, 0] - ax, dst[t, 2, 1] - ay
        det = e1x * e2y - e1y * e2x
        if abs(det) < 1e-9:
            continue  # collapsed: covers no pixel
        # Barycentric coordinates (b1, b2) of a point: its offset from vertex 0 in (e1, e2).
        i11, i12, i21, i22 = e2y / det, -e2x / det, -e1y / det, e1x / det
        sx, sy = src[t, 0, 0], src[t, 0, 1]
        s1x, s1y = src[t, 1, 0] - sx, src[t, 1, 1] - sy
        s2x, s2y = src[t, 2, 0] - sx, src[t, 2, 1] - sy
        # source = s0 + [s1 s2] @ inv @ (p - a): the affine's linear part and offset.
        l11, l12 = s1x * i11 + s2x * i21, s1x * i12 + s2x * i22
        l21, l22 = s1y * i11 + s2y * i21, s1y * i12 + s2y * i22
        lo_x = min(ax, dst[t, 1, 0], dst[t, 2, 0])
        hi_x = max(ax, dst[t, 1, 0], dst[t, 2, 0])
        lo_y = min(ay, dst[t, 1, 1], dst[t, 2, 1])
        hi_y = max(ay, dst[t, 1, 1], dst[t, 2, 1])
        r0 = max(int(math.ceil((lo_y - y0 + 0.5) / step - 0.5 - _EPS)), 0)
        r1 = min(int(math.floor((hi_y - y0 + 0.5) / step - 0.5 + _EPS)), h - 1)
        c_lo = max(int(math.ceil((lo_x - x0 + 0.5) / step - 0.5 - _EPS)), 0)
        c_hi = min(int(math.floor((hi_x - x0 + 0.5) / step - 0.5 + _EPS)), w - 1)
        if r0 > r1 or c_lo > c_hi:
            continue
        # Per row, the span of columns inside: b1 >= 0, b2 >= 0, 1 - b1 - b2 >= 0, each
        # linear in x: coefficient g and value at x = 0.
        for r in range(r0, r1 + 1):
            y = y0 + (r + 0.5) * step - 0.5
            dy = y - ay
            lo, hi = float(c_lo), float(c_hi)
            empty = False
            for e in range(3):
                if e == 0:
                    g, v = i11, i12 * dy - i11 * ax
                elif e == 1:
                    g, v = i21, i22 * dy - i21 * ax
                else:
                    g = -(i11 + i21)
                    v = 1.0 - (i12 + i22) * dy + (i11 + i21) * ax
                # g * x + v >= -tol, in sample columns: x = x0 + (c + 0.5) * step - 0.5
                gc = g * step
                vc = v + g * (x0 + 0.5 * step - 0.5)
                tol = _EPS * (abs(g) + 1e-12)
                if gc > 0:
                    lo = max(lo, math.ceil((-tol - vc) / gc))
                elif gc < 0:
                    hi = min(hi, math.floor((-tol - vc) / gc))
                elif vc < -tol:
                    empty = True
            if empty or lo > hi:
                continue
            # Along the row the source coordinate is linear in the column: start + c * slope.
            x_at_0 = x0 + 0.5 * step - 0.5
            bx = np.float32(sx - l11 * ax - l12 * ay + l12 * y + l11 * x_at_0)
            by = np.float32(sy - l21 * ax - l22 * ay + l22 * y + l21 * x_at_0)
            gx, gy = np.float32(l11 * step), np.float32(l21 * step)
            row_x, row_y = map_x[r], map_y[r]
            for c in range(int(lo), int(hi) + 1):
                row_x[c] = bx + gx * np.float32(c)
                row_y[c] = by + gy * np.float32(c)


@numba.njit("void(float64[:, :, ::1], int64, float64[::1], float64[::1], int64[:, ::1], boolean[::1], "
            "float64[::1])", cache=True, nogil=True)
def face_drawing_keys(dst, start, source_det, depth, depth_points, flipped, face_depth):
    """What orders the face triangles dst[start:] (T, 3, 2) for drawing, per triangle: whether a
    turn flipped it over (its orientation against the source's, source_det) and its depth (the
    mean of its points' z, depth[depth_points]). The same arithmetic as numpy on the arrays."""
    for k in range(dst.shape[0] - start):
        t = start + k
        e1x, e1y = dst[t, 1, 0] - dst[t, 0, 0], dst[t, 1, 1] - dst[t, 0, 1]
        e2x, e2y = dst[t, 2, 0] - dst[t, 0, 0], dst[t, 2, 1] - dst[t, 0, 1]
        flipped[k] = (e1x * e2y - e1y * e2x) * source_det[t] <= 0
        face_depth[k] = (depth[depth_points[k, 0]] + depth[depth_points[k, 1]] + depth[depth_points[k, 2]]) / 3.0


@numba.njit("void(uint8[:, :, ::1], uint8[:, :, ::1], uint8[:, ::1], uint8[:, :, ::1])", cache=True, nogil=True)
def composite(warped, plate, alpha, out):
    """out = the warped person `warped` (RGBA; its own alpha is not used) over `plate` (RGB)
    by `alpha` (0..255), rounded: where alpha is 0 the plate's pixel, bit for bit; where 255,
    the warped pixel's."""
    flat_w, flat_p, flat_a, flat_o = warped.reshape(-1), plate.reshape(-1), alpha.reshape(-1), out.reshape(-1)
    for i in range(flat_a.shape[0]):
        a = np.int32(flat_a[i])
        b = 255 - a
        for ch in range(3):
            x = np.int32(flat_w[4 * i + ch]) * a + np.int32(flat_p[3 * i + ch]) * b + 128
            flat_o[3 * i + ch] = (x + (x >> 8)) >> 8  # x / 255, rounded (exact on 0..255 * 255)


@numba.njit("void(float64[:, ::1], int64[::1], float64[:, ::1], int64[::1], int64[::1], float64[::1], float64, "
            "int64, int64, float64, int64[::1], int64[:, ::1], float64[::1], float64[::1], int64[::1], int64[::1], "
            "float64[::1], float64[::1], float64)", cache=True, nogil=True)
def unfold_outline(v, oval, radial, sector_start, sector_points, clearance, scale, eye_a, eye_b, eye_angle,
                   extra, anchors, side, extra_out, chain_start, chain_points, chain_along, oval_along, stretch):
    """The warp's face edge kept outside the face (engines.warp.Reenactor._unfold_outline), in
    place on the frame's vertices v (N, 2).

    oval: the outline's points; radial (oval, 2): each one's direction from the outline's centre
    in the source, turned here by the head's roll (the eye line eye_a -> eye_b against its
    source angle eye_angle); sector_points[sector_start[i]:sector_start[i + 1]]: the face points
    in oval point i's sector; clearance: how far outside its sector each lies in the source
    (source pixels; scale: output pixels per source pixel). extra: the face's hull points off the
    oval, each with the oval points either side (anchors), the sign of the chord's outward normal
    (side) and how far out of the chord it lies in the source, in chord lengths (extra_out).
    chain_points[chain_start[i]:chain_start[i + 1]]: the face points nearest in direction to oval
    point i, from the outline inwards, and how far out along its direction each lies in the source
    (chain_along; oval_along: the oval point's): no strip between two of them, nor between the
    outermost and the oval, ends up more than `stretch` times as wide as in the source."""
    n = oval.shape[0]
    cx, cy = 0.0, 0.0
    for i in range(n):
        cx += v[oval[i], 0]
        cy += v[oval[i], 1]
    cx /= n
    cy /= n
    roll = math.atan2(v[eye_b, 1] - v[eye_a, 1], v[eye_b, 0] - v[eye_a, 0]) - eye_angle
    cos, sin = math.cos(roll), math.sin(roll)
    for i in range(n):
        dx = radial[i, 0] * cos - radial[i, 1] * sin
        dy = radial[i, 0] * sin + radial[i, 1] * cos
        reach = -1e300
        for k in range(sector_start[i], sector_start[i + 1]):
            p = sector_points[k]
            reach = max(reach, (v[p, 0] - cx) * dx + (v[p, 1] - cy) * dy)
        if reach == -1e300:
            continue
        o = oval[i]
        out = reach + scale * clearance[i] - ((v[o, 0] - cx) * dx + (v[o, 1] - cy) * dy)
        if out > 0.0:  # (the sectors hold no oval point: moving one changes no other's reach)
            v[o, 0] += out * dx
            v[o, 1] += out * dy
    for j in range(extra.shape[0]):
        a, b, p = anchors[j, 0], anchors[j, 1], extra[j]
        chord_x, chord_y = v[b, 0] - v[a, 0], v[b, 1] - v[a, 1]
        nx, ny = -chord_y * side[j], chord_x * side[j]  # out, a chord long
        length2 = max(chord_x * chord_x + chord_y * chord_y, 1e-12)
        lift = extra_out[j] - ((v[p, 0] - v[a, 0]) * nx + (v[p, 1] - v[a, 1]) * ny) / length2
        if lift > 0.0:
            v[p, 0] += lift * nx
            v[p, 1] += lift * ny
    # A turn reveals the side of the head the portrait shows foreshortened: the oval swings out
    # and the outermost strip of cheek, a few source pixels, would stretch across all of it.
    # Share the stretch with the strips inside (each point out along its oval point's direction).
    for i in range(n):
        dx = radial[i, 0] * cos - radial[i, 1] * sin
        dy = radial[i, 0] * sin + radial[i, 1] * cos
        o = oval[i]
        outer = (v[o, 0] - cx) * dx + (v[o, 1] - cy) * dy
        outer0 = oval_along[i]
        for k in range(chain_start[i], chain_start[i + 1]):
            gap = outer0 - chain_along[k]
            if gap <= 0.0:
                continue  # (level with the point outside it in the source: no strip between them)
            p = chain_points[k]
            here = (v[p, 0] - cx) * dx + (v[p, 1] - cy) * dy
            need = outer - stretch * scale * gap
            if need > here:
                v[p, 0] += (need - here) * dx
                v[p, 1] += (need - here) * dy
                here = need
            outer, outer0 = here, chain_along[k]
