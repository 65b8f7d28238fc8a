/* Decode one rectangle of a baseline or progressive JPEG at 1/1, 1/2, 1/4 or 1/8 scale to 8-bit
 * RGB with libjpeg-turbo's DCT scaling (scale_denom), horizontal cropping (jpeg_crop_scanline)
 * and row skipping (jpeg_skip_scanlines). Errors come back as text, never as exit(). */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct cj_err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    size_t msg_len;
};

static void cj_error_exit(j_common_ptr cinfo) {
    struct cj_err *e = (struct cj_err *)cinfo->err;
    if (e->msg && e->msg_len > 0) {
        char buf[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, buf);
        snprintf(e->msg, e->msg_len, "%s", buf);
    }
    longjmp(e->jump, 1);
}

static void cj_emit_message(j_common_ptr cinfo, int level) {
    (void)cinfo;
    (void)level; /* warnings (e.g. premature end of data) are tolerated, as Pillow does */
}

/* Image size. Returns 0, or -1 with a message. */
int cj_jpeg_size(const unsigned char *buf, unsigned long len, unsigned *w, unsigned *h,
                 char *msg, size_t msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct cj_err jerr;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = cj_error_exit;
    jerr.pub.emit_message = cj_emit_message;
    jerr.msg = msg;
    jerr.msg_len = msg_len;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, buf, len);
    jpeg_read_header(&cinfo, TRUE);
    *w = cinfo.image_width;
    *h = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Decode columns [*x, *x + *w) and rows [y, y + h) of the image scaled by 1/denom (coordinates in
 * the scaled image). The column range is widened to whole iMCUs: *x and *w return what was
 * decoded. `out` receives *w * h RGB pixels and must hold (scaled width) * h * 3 bytes.
 * Returns 0, -1 with a message, or -2 when the colour space cannot become RGB here. */
int cj_jpeg_decode_region(const unsigned char *buf, unsigned long len, unsigned denom,
                          unsigned *x, unsigned *w, unsigned y, unsigned h, unsigned char *out,
                          unsigned long out_cap, unsigned *scaled_w, unsigned *scaled_h,
                          char *msg, size_t msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct cj_err jerr;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = cj_error_exit;
    jerr.pub.emit_message = cj_emit_message;
    jerr.msg = msg;
    jerr.msg_len = msg_len;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, buf, len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return -2;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    cinfo.dct_method = JDCT_ISLOW;
    jpeg_start_decompress(&cinfo);
    *scaled_w = cinfo.output_width;
    *scaled_h = cinfo.output_height;
    if (*x >= cinfo.output_width || *w == 0 || y >= cinfo.output_height || h == 0 ||
        y + h > cinfo.output_height || *x + *w > cinfo.output_width) {
        snprintf(msg, msg_len, "region %ux%u at (%u, %u) outside the %ux%u image", *w, h, *x, y,
                 cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION cx = *x, cw = *w;
    if (cw < cinfo.output_width) jpeg_crop_scanline(&cinfo, &cx, &cw);
    *x = cx;
    *w = cw;
    if ((unsigned long)cw * h * 3 > out_cap) {
        snprintf(msg, msg_len, "output buffer too small");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (y > 0) jpeg_skip_scanlines(&cinfo, y);
    unsigned row = 0;
    while (row < h) {
        JSAMPROW r = out + (unsigned long)row * cw * 3;
        if (jpeg_read_scanlines(&cinfo, &r, 1) != 1) {
            snprintf(msg, msg_len, "truncated image data");
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        row++;
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
