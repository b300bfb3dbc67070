// cellcls in the browser: decode, resize and classify images on this machine (no image leaves the page).
//
// The same recipe as cellcls.data.decode, step for step, so the probabilities equal `python -m cellcls.predict`'s:
// PNG files are decoded here (8- and 16-bit, every colour type; 16-bit greyscale rescaled over its own range as
// Pillow's path does), other formats by the browser with colour management off; colour to grey with Pillow's
// integer luma; Pillow's antialiased bilinear resize in its fixed-point arithmetic; pixel / 255 in float32. The
// exported ONNX graph holds the normalisation, the network and the out-of-distribution score; the card holds the
// operating point, the prediction-set threshold and the upload limits.
"use strict";

const cellclsLocal = (() => {
  const PRECISION_BITS = 32 - 8 - 2; // Pillow's Resample.c, 8 bits per channel
  const GREY_MODES = new Set(["L", "I", "I;16", "I;16B", "I;16L", "F", "1"]);

  class Unreadable extends Error {}

  // ---- PNG ---------------------------------------------------------------------------------------------------
  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function paeth(a, b, c) {
    const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
    return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
  }

  function unfilter(data, height, stride, bpp, name) {
    const out = new Uint8Array(height * stride);
    for (let y = 0; y < height; y++) {
      const type = data[y * (stride + 1)], src = y * (stride + 1) + 1, row = y * stride, prev = row - stride;
      for (let x = 0; x < stride; x++) {
        const raw = data[src + x];
        const a = x >= bpp ? out[row + x - bpp] : 0, b = y ? out[prev + x] : 0, c = y && x >= bpp ? out[prev + x - bpp] : 0;
        let v;
        switch (type) {
          case 0: v = raw; break;
          case 1: v = raw + a; break;
          case 2: v = raw + b; break;
          case 3: v = raw + ((a + b) >> 1); break;
          case 4: v = raw + paeth(a, b, c); break;
          default: throw new Unreadable(`${name}: corrupt PNG (row filter ${type})`);
        }
        out[row + x] = v & 255;
      }
    }
    return out;
  }

  // A PNG as Pillow opens it: {width, height, mode, channels (1 or 3 of uint8, interleaved), grey16 (for I;16)}.
  async function decodePng(buffer, name) {
    const view = new DataView(buffer), bytes = new Uint8Array(buffer);
    let offset = 8, header = null, palette = null;
    const parts = [];
    while (offset + 8 <= bytes.length) {
      const length = view.getUint32(offset), type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
      const body = bytes.subarray(offset + 8, offset + 8 + length);
      if (type === "IHDR") {
        header = {width: view.getUint32(offset + 8), height: view.getUint32(offset + 12), depth: body[8], color: body[9], interlace: body[12]};
      } else if (type === "PLTE") palette = body;
      else if (type === "IDAT") parts.push(body);
      else if (type === "IEND") break;
      offset += 12 + length;
    }
    if (!header || !parts.length) throw new Unreadable(`${name}: not a complete PNG file (no IHDR or IDAT chunk)`);
    const {width, height, depth, color} = header;
    if (header.interlace) { // Adam7: the browser's own decoder takes it, which gives 8 bits per sample only
      if (depth === 16) throw new Unreadable(`${name}: an interlaced 16-bit PNG cannot be decoded here as cellcls does; use python -m cellcls.predict or cellcls.serve`);
      return {interlaced: true, mode: color === 0 || color === 4 ? "L" : color === 3 ? "P" : "RGB"};
    }
    const samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color];
    if (!samples) throw new Unreadable(`${name}: PNG colour type ${color} is not valid`);
    let packed = 0;
    for (const p of parts) packed += p.length;
    const joined = new Uint8Array(packed);
    packed = 0;
    for (const p of parts) { joined.set(p, packed); packed += p.length; }
    const stride = Math.ceil((width * samples * depth) / 8), bpp = Math.max(1, (samples * depth) >> 3);
    let raw;
    try { raw = await inflate(joined); } catch (err) { throw new Unreadable(`${name}: corrupt PNG data (${err.message})`); }
    if (raw.length < height * (stride + 1)) throw new Unreadable(`${name}: truncated PNG (image data ends early)`);
    const px = unfilter(raw, height, stride, bpp, name);
    const n = width * height;
    const sample = (i, s) => { // sample s of pixel i, as Pillow reads it: 16-bit colour keeps its high byte
      if (depth === 16) return px[(i * samples + s) * 2];
      if (depth === 8) return px[i * samples + s];
      const perByte = 8 / depth, row = Math.floor(i / width), col = i % width;
      const byte = px[row * stride + Math.floor(col / perByte)];
      return (byte >> (8 - depth * (1 + (col % perByte)))) & ((1 << depth) - 1);
    };
    if (color === 0 && depth === 16) {
      const grey16 = new Uint16Array(n);
      for (let i = 0; i < n; i++) grey16[i] = (px[2 * i] << 8) | px[2 * i + 1];
      return {width, height, mode: "I;16", grey16};
    }
    if (color === 0 || color === 4) { // L (1/2/4-bit scaled to 0-255) or LA, whose alpha Pillow's convert drops
      const scale = depth < 8 ? 255 / ((1 << depth) - 1) : 1, grey = new Uint8Array(n);
      for (let i = 0; i < n; i++) grey[i] = sample(i, 0) * scale;
      return {width, height, mode: depth === 1 ? "1" : color === 0 ? "L" : "LA", pixels: grey, channels: 1};
    }
    const rgb = new Uint8Array(n * 3);
    for (let i = 0; i < n; i++) {
      if (color === 3) {
        const k = sample(i, 0) * 3, pal = palette || new Uint8Array(0); // an index past the palette is black
        rgb[3 * i] = pal[k] || 0; rgb[3 * i + 1] = pal[k + 1] || 0; rgb[3 * i + 2] = pal[k + 2] || 0;
      } else for (let s = 0; s < 3; s++) rgb[3 * i + s] = sample(i, s);
    }
    return {width, height, mode: color === 3 ? "P" : color === 2 ? "RGB" : "RGBA", pixels: rgb, channels: 3};
  }

  // ---- other formats, through the browser -------------------------------------------------------------------
  function jpegIsGrey(bytes) { // the frame header's component count (1: greyscale)
    for (let i = 2; i + 9 < bytes.length;) {
      if (bytes[i] !== 0xff) return false;
      const marker = bytes[i + 1], length = (bytes[i + 2] << 8) | bytes[i + 3];
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) return bytes[i + 9] === 1;
      i += 2 + length;
    }
    return false;
  }

  async function decodeWithBrowser(file, bytes, name, mode) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, {colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image"});
    } catch (err) {
      throw new Unreadable(`cannot decode image ${name}: this browser cannot read it (PNG, JPEG, BMP, GIF and WebP work here; ` +
        "TIFF and DICOM need python -m cellcls.predict or cellcls.serve)");
    }
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d", {willReadFrequently: true});
    ctx.drawImage(bitmap, 0, 0);
    const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
    const n = bitmap.width * bitmap.height, rgb = new Uint8Array(n * 3);
    for (let i = 0; i < n; i++) { rgb[3 * i] = rgba[4 * i]; rgb[3 * i + 1] = rgba[4 * i + 1]; rgb[3 * i + 2] = rgba[4 * i + 2]; }
    const grey = bytes[0] === 0xff && bytes[1] === 0xd8 && jpegIsGrey(bytes);
    return {width: bitmap.width, height: bitmap.height, mode: mode || (grey ? "L" : "RGB"), pixels: rgb, channels: 3};
  }

  function isDicom(bytes, name) {
    const magic = bytes.length > 132 && String.fromCharCode(...bytes.subarray(128, 132)) === "DICM";
    return magic || /\.(dcm|dicom)$/i.test(name);
  }

  // ---- Pillow's conversions and resize ----------------------------------------------------------------------
  function toChannels(img, channels) { // Pillow's convert("L") / convert("RGB")
    const n = img.width * img.height;
    if (img.grey16) { // cellcls.data.decode._to_l: rescale the image's own range, then truncate
      let lo = Infinity, hi = -Infinity;
      for (const v of img.grey16) { if (v < lo) lo = v; if (v > hi) hi = v; }
      const grey = new Uint8Array(n);
      if (hi > lo) for (let i = 0; i < n; i++) grey[i] = Math.floor(((img.grey16[i] - lo) / (hi - lo)) * 255.0);
      img = {...img, pixels: grey, channels: 1};
    }
    if (img.channels === channels) return img.pixels;
    const out = new Uint8Array(n * channels);
    if (channels === 1) {
      for (let i = 0; i < n; i++) {
        const p = img.pixels;
        out[i] = (p[3 * i] * 19595 + p[3 * i + 1] * 38470 + p[3 * i + 2] * 7471 + 0x8000) >>> 16;
      }
    } else for (let i = 0; i < n; i++) out[3 * i] = out[3 * i + 1] = out[3 * i + 2] = img.pixels[i];
    return out;
  }

  function coefficients(inSize, outSize) { // Resample.c precompute_coeffs + normalize_coeffs_8bpc, bilinear
    const scale = inSize / outSize, filterscale = Math.max(scale, 1.0), support = 1.0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1, ss = 1.0 / filterscale;
    const bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
    const weights = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
      const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) {
        const t = Math.abs((x + xmin - center + 0.5) * ss), w = t < 1.0 ? 1.0 - t : 0.0;
        weights[x] = w; ww += w;
      }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0.0 ? weights[x] / ww : weights[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS)) : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
      }
      bounds[2 * xx] = xmin; bounds[2 * xx + 1] = xmax;
    }
    return {bounds, kk, ksize};
  }

  const clip8 = (v) => { const s = Math.floor(v / (1 << PRECISION_BITS)); return s < 0 ? 0 : s > 255 ? 255 : s; };

  function resize(pixels, width, height, channels, outWidth, outHeight) { // Image.resize(BILINEAR, reducing_gap=None)
    let src = pixels, w = width;
    if (outWidth !== width) {
      const {bounds, kk, ksize} = coefficients(width, outWidth), out = new Uint8Array(outWidth * height * channels);
      for (let y = 0; y < height; y++) for (let xx = 0; xx < outWidth; xx++) {
        const xmin = bounds[2 * xx], xmax = bounds[2 * xx + 1];
        for (let c = 0; c < channels; c++) {
          let s = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) s += src[(y * w + x + xmin) * channels + c] * kk[xx * ksize + x];
          out[(y * outWidth + xx) * channels + c] = clip8(s);
        }
      }
      src = out; w = outWidth;
    }
    if (outHeight !== height) {
      const {bounds, kk, ksize} = coefficients(height, outHeight), out = new Uint8Array(w * outHeight * channels);
      for (let yy = 0; yy < outHeight; yy++) {
        const ymin = bounds[2 * yy], ymax = bounds[2 * yy + 1];
        for (let x = 0; x < w * channels; x++) {
          let s = 1 << (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) s += src[(y + ymin) * w * channels + x] * kk[yy * ksize + y];
          out[yy * w * channels + x] = clip8(s);
        }
      }
      src = out;
    }
    return src;
  }

  // ---- the model's input ------------------------------------------------------------------------------------
  // One file as the model sees it: {pixels (uint8, interleaved, model size), width, height, mode} of the original.
  async function prepare(file, card) {
    const spec = card.input, name = file.name, lim = card.limits;
    if (file.size > lim.max_image_mb * 1048576) {
      throw new Unreadable(`${name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${lim.max_image_mb} MB per image`);
    }
    if (!file.size) throw new Unreadable(`${name} is empty (0 bytes)`);
    const buffer = await file.arrayBuffer(), bytes = new Uint8Array(buffer);
    if (isDicom(bytes, name)) {
      throw new Unreadable(`${name} is a DICOM file: the browser cannot decode DICOM; use python -m cellcls.predict or cellcls.serve`);
    }
    const png = bytes[0] === 0x89 && bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47;
    let img = png ? await decodePng(buffer, name) : null;
    if (img === null || img.interlaced) img = await decodeWithBrowser(file, bytes, name, img && img.mode);
    if (img.width * img.height > lim.max_pixels) {
      throw new Unreadable(`${name}: ${img.width}x${img.height} pixels is over the limit of ${lim.max_pixels.toLocaleString("en")} pixels`);
    }
    const pixels = toChannels(img, spec.channels);
    return {pixels: resize(pixels, img.width, img.height, spec.channels, spec.width, spec.height),
            width: img.width, height: img.height, mode: img.mode};
  }

  function unusual(reference, image, slack) { // cellcls.data.reference.unusual
    if (!reference) return [];
    const notes = [];
    const [[w0, w1], [h0, h1]] = [reference.width, reference.height];
    if (!(w0 / slack <= image.width && image.width <= w1 * slack && h0 / slack <= image.height && image.height <= h1 * slack)) {
      notes.push(`its size ${image.width}x${image.height} px is far from the training images' (${w0}-${w1} x ${h0}-${h1} px)`);
    }
    // a kind is unusual only when training had none of it (mixed training modes flag neither)
    const grey = GREY_MODES.has(image.mode), seen = reference.modes.some((m) => GREY_MODES.has(m) === grey);
    if (!seen) {
      notes.push(`it is a ${grey ? "greyscale" : "colour"} image; the model was trained on ${grey ? "colour" : "greyscale"} images`);
    }
    let sum = 0;
    for (const v of image.pixels) sum += v;
    const mean = sum / image.pixels.length / 255, [lo, hi] = reference.intensity;
    if (!(lo <= mean && mean <= hi)) {
      notes.push(`its mean brightness ${mean.toFixed(2)} is outside the training range ${lo.toFixed(2)}-${hi.toFixed(2)}`);
    }
    return notes;
  }

  function setScores(probs, method) { // cellcls.scoring.conformal.scores
    if (method === "lac") return probs.map((p) => 1 - p);
    const order = probs.map((p, k) => k).sort((a, b) => probs[b] - probs[a] || a - b), out = new Array(probs.length);
    let mass = 0;
    for (const k of order) { mass += probs[k]; out[k] = mass; }
    return out;
  }

  function decideFindings(name, probs, card, warnings) { // Classifier.findings_result: each finding on its own
    const classes = card.classes, cuts = card.decision.thresholds;
    const present = probs.map((p, k) => p >= cuts[k]), found = classes.filter((c, k) => present[k]);
    return {name, ok: true, label: found.join("|") || "No Finding", findings: found, warnings,
      thresholds: Object.fromEntries(classes.map((c, k) => [c, cuts[k]])),
      confidence: Math.min(...probs.map((p, k) => present[k] ? p : 1 - p)),
      probabilities: Object.fromEntries(classes.map((c, k) => [c, probs[k]])), cam_png: null, error: null,
      uncertain: probs.some((p, k) => Math.abs(p - cuts[k]) < card.limits.uncertain_margin / 2)};
  }

  function decide(name, probs, score, card, warnings) { // the card's decision rule, as cellcls.deploy.server does it
    if (card.task === "multilabel") return decideFindings(name, probs, card, warnings);
    const classes = card.classes, rule = card.decision || {};
    let best = 0;
    for (let k = 1; k < probs.length; k++) if (probs[k] > probs[best]) best = k;
    if (probs.length === 2 && rule.threshold !== null && rule.threshold !== undefined) best = probs[1] >= rule.threshold ? 1 : 0;
    const sorted = [...probs].sort((a, b) => a - b), runnerUp = sorted[sorted.length - 2];
    const result = {name, ok: true, label: classes[best], confidence: probs[best], warnings,
      probabilities: Object.fromEntries(classes.map((c, k) => [c, probs[k]])), cam_png: null, error: null,
      uncertain: probs[best] - runnerUp < card.limits.uncertain_margin};
    if (rule.set_threshold !== null && rule.set_threshold !== undefined && rule.set_method) {
      const s = setScores(probs, rule.set_method);
      const members = classes.filter((c, k) => k === best || s[k] <= rule.set_threshold + 1e-12);
      result.prediction_set = {classes: members, level: rule.set_level};
      result.uncertain = result.uncertain || members.length > 1;
    }
    if (score !== null && card.ood) {
      result.outside = score > card.ood.threshold;
      if (result.outside) result.warnings = [...warnings, `${card.web.outside} (its activation statistics are far from the training images')`];
    }
    return result;
  }

  let session = null;
  async function load(base) {
    ort.env.wasm.wasmPaths = new URL("ort/", base).href;
    ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a plain static server does not give
    session = await ort.InferenceSession.create(new URL("model.onnx", base).href, {executionProviders: ["wasm"]});
    return session;
  }

  // Results for a list of files, in the server's result format; unreadable files get ok: false and the reason.
  async function classify(files, card) {
    const spec = card.input, size = spec.channels * spec.height * spec.width;
    const prepared = [], results = new Array(files.length);
    for (let i = 0; i < files.length; i++) {
      try { prepared.push([i, await prepare(files[i], card)]); } catch (err) {
        if (!(err instanceof Unreadable)) throw err;
        results[i] = {name: files[i].name, ok: false, error: err.message};
      }
    }
    if (prepared.length) {
      const input = new Float32Array(prepared.length * size), unit = Math.fround(1 / 255);
      prepared.forEach(([, image], b) => { // interleaved H x W x C to planar C x H x W
        const hw = spec.height * spec.width;
        for (let c = 0; c < spec.channels; c++) for (let j = 0; j < hw; j++) {
          input[b * size + c * hw + j] = Math.fround(image.pixels[j * spec.channels + c] * unit);
        }
      });
      const feeds = {image: new ort.Tensor("float32", input, [prepared.length, spec.channels, spec.height, spec.width])};
      const out = await session.run(feeds);
      const probs = out.probabilities.data, k = card.classes.length, scores = card.ood ? out[card.ood.output].data : null;
      prepared.forEach(([i, image], b) => {
        const row = Array.from(probs.subarray(b * k, (b + 1) * k));
        results[i] = decide(files[i].name, row, scores ? scores[b] : null, card, unusual(spec.training_range, image, card.web.size_slack));
      });
    }
    return results;
  }

  return {load, classify, prepare, resize, Unreadable};
})();
