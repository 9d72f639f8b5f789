/**
 * The VGA screen of a v86 machine without a page to draw on (Node, the tab's Worker): its text with colours,
 * and pictures of it. v86 then keeps only characters in a stand-in screen adapter; its methods are wrapped here
 * (v86 calls them by name on every change) so the text screen keeps its colours and the cursor, and a picture
 * can be made at any moment:
 *
 * - text modes are drawn with the font the guest's VGA holds (plane 2, where the VGA BIOS or the guest loaded
 *   it), 8 or 9 pixels wide, with the attribute colours the DAC gives;
 * - graphics modes come from v86's own frame buffer (it renders VGA and VBE modes into RGBA).
 *
 * No platform imports: Node and the browser Worker share this file.
 */

export interface Frame {
  width: number;
  height: number;
  /** RGBA, 4 bytes per pixel, rows top to bottom. */
  rgba: Uint8Array;
}

/** Code page 437, the VGA's character set, as Unicode (NUL shown as a space). */
const CP437 =
  ' ☺☻♥♦♣♠•◘○◙♂♀♪♫☼►◄↕‼¶§▬↨↑↓→←∟↔▲▼' +
  ' !"#$%&\'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~⌂' +
  'ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»' +
  '░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀' +
  'αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u00a0';
const CHARS = [...CP437];
if (CHARS.length !== 256) throw new Error(`CP437 table has ${CHARS.length} entries`);

/** The members of v86's screen adapter this file wraps or reads (names survive v86's minification). */
interface ScreenAdapter {
  [method: string]: unknown;
}

/** The members of v86's VGA device read here. */
interface Vga {
  graphical_mode: boolean;
  svga_enabled: boolean;
  screen_width: number;
  screen_height: number;
  plane2: Uint8Array;
  max_scan_line: number;
  clocking_mode: number;
  attribute_mode: number;
  character_map_select: number;
  max_cols: number;
  max_rows: number;
  screen_fill_buffer(): void;
  complete_redraw(): void;
  complete_replot(): void;
  cpu: { svga_mark_dirty(): void };
}

interface Layer {
  image_data: { data: Uint8ClampedArray; width: number; height: number };
  screen_x: number;
  screen_y: number;
  buffer_x: number;
  buffer_y: number;
  buffer_width: number;
  buffer_height: number;
}

/** put_char's flag bit for the second font page (v86's screen adapter contract; bit 0, blinking, is ignored: a
 * picture shows blinking text in its visible phase). */
const FLAG_FONT_PAGE_B = 2;

/**
 * v86 keeps the graphics frame buffer in an ImageData, which Node lacks: without one it keeps no frame at all.
 * This stand-in holds the same three fields; it is installed only where the platform has none.
 */
export function provideImageData(): void {
  const scope = globalThis as { ImageData?: unknown };
  if (typeof scope.ImageData !== 'undefined') return;
  scope.ImageData = class ImageData {
    readonly data: Uint8ClampedArray;
    readonly width: number;
    readonly height: number;
    constructor(data: Uint8ClampedArray | number, width: number, height?: number) {
      if (typeof data === 'number') {
        this.width = data;
        this.height = width;
        this.data = new Uint8ClampedArray(data * width * 4);
      } else {
        this.data = data;
        this.width = width;
        this.height = height ?? data.length / 4 / width;
      }
    }
  };
}

export class ScreenCapture {
  private cols = 80;
  private rows = 25;
  private chars = new Uint8Array(80 * 25);
  private flags = new Uint8Array(80 * 25);
  private bg = new Uint32Array(80 * 25);
  private fg = new Uint32Array(80 * 25);
  private cursor = { row: 0, col: 0 };
  private cursorShape = { start: 14, end: 15, visible: true };
  private graphical = false;
  private graphicalSize: { width: number; height: number } | undefined;
  private composed: Frame | undefined;
  private readonly listeners = new Set<() => void>();
  /** Counts changes, so a poller can tell whether anything was drawn since it last looked. */
  version = 0;

  /**
   * Watches `emulator` (a V86). v86 makes its screen adapter and VGA once its wasm is in; the adapter's methods
   * are wrapped then, and the VGA redraws the text screen once so that what it drew before is known too.
   */
  constructor(private readonly emulator: { screen_adapter?: unknown; v86?: unknown; add_listener(event: string, listener: () => void): void }) {
    if (emulator.screen_adapter) this.watch(emulator.screen_adapter as ScreenAdapter);
    else emulator.add_listener('emulator-loaded', () => this.watch(emulator.screen_adapter as ScreenAdapter));
  }

  private watch(adapter: ScreenAdapter | undefined): void {
    if (!adapter) throw new Error('this v86 build has no screen adapter to watch');
    const wrap = (name: string, after: (...args: never[]) => void) => {
      const original = adapter[name] as ((...args: unknown[]) => unknown) | undefined;
      adapter[name] = (...args: unknown[]) => {
        const result = typeof original === 'function' ? original.apply(adapter, args) : undefined;
        (after as (...args: unknown[]) => void)(...args);
        this.changed();
        return result;
      };
    };
    wrap('put_char', (row: number, col: number, chr: number, flags: number, bg: number, fg: number) => {
      if (row >= this.rows || col >= this.cols) return;
      const at = row * this.cols + col;
      this.chars[at] = chr;
      this.flags[at] = flags;
      this.bg[at] = bg;
      this.fg[at] = fg;
    });
    wrap('set_size_text', (cols: number, rows: number) => this.resizeText(cols, rows));
    wrap('set_mode', (graphical: boolean) => {
      this.graphical = graphical;
    });
    wrap('set_size_graphical', (width: number, height: number) => {
      this.graphicalSize = { width, height };
    });
    wrap('update_cursor', (row: number, col: number) => {
      this.cursor = { row, col };
    });
    wrap('update_cursor_scanline', (start: number, end: number, visible: boolean) => {
      this.cursorShape = { start, end, visible };
    });
    wrap('update_buffer', (layers: Layer[]) => this.compose(layers));
    wrap('clear_screen', () => {});
    const vga = this.vga();
    if (vga) {
      this.graphical = vga.graphical_mode;
      if (!vga.graphical_mode) {
        if (vga.max_cols > 0 && vga.max_rows > 0) this.resizeText(vga.max_cols, vga.max_rows);
        vga.complete_redraw();
      }
    }
  }

  private resizeText(cols: number, rows: number): void {
    if (cols === this.cols && rows === this.rows) return;
    this.cols = cols;
    this.rows = rows;
    this.chars = new Uint8Array(cols * rows);
    this.flags = new Uint8Array(cols * rows);
    this.bg = new Uint32Array(cols * rows);
    this.fg = new Uint32Array(cols * rows);
  }

  /** Calls listener after every change to the screen; returns an unsubscribe function. */
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private changed(): void {
    this.version++;
    for (const listener of this.listeners) listener();
  }

  private vga(): Vga | undefined {
    return (this.emulator.v86 as { cpu?: { devices?: { vga?: Vga } } } | undefined)?.cpu?.devices?.vga;
  }

  /** Whether the guest shows a graphics mode (VGA graphics or VBE), and its size. */
  get mode(): { graphical: false; cols: number; rows: number } | { graphical: true; width: number; height: number } {
    const vga = this.vga();
    if (this.graphical || vga?.graphical_mode) {
      const width = vga?.screen_width || this.graphicalSize?.width || 0;
      const height = vga?.screen_height || this.graphicalSize?.height || 0;
      return { graphical: true, width, height };
    }
    return { graphical: false, cols: this.cols, rows: this.rows };
  }

  /**
   * Each text row, full width (no rows in a graphics mode). Trailing blanks stay: a prompt such as '# ' is
   * followed by the cursor's blank cell, and matching it needs that space.
   */
  textRows(): string[] {
    if (this.mode.graphical) return [];
    const rows: string[] = [];
    for (let row = 0; row < this.rows; row++) {
      let line = '';
      for (let col = 0; col < this.cols; col++) line += CHARS[this.chars[row * this.cols + col]!];
      rows.push(line);
    }
    return rows;
  }

  /** The text screen, rows joined by newlines ('' in a graphics mode). */
  text(): string {
    return this.textRows().join('\n');
  }

  /** For error messages: the screen's rows up to the last one with text, or what graphics mode it shows. */
  lastLines(n = 25): string {
    const mode = this.mode;
    if (mode.graphical) return `(a ${mode.width}x${mode.height} graphics mode: no text)`;
    const rows = this.textRows().map((row) => row.trimEnd());
    while (rows.length && rows[rows.length - 1] === '') rows.pop();
    return rows.slice(-n).join('\n');
  }

  /** The cursor position and shape, for views that draw their own. */
  get cursorState(): { row: number; col: number; visible: boolean } {
    return { ...this.cursor, visible: this.cursorShape.visible };
  }

  /** A picture of the screen as it is now. */
  frame(): Frame {
    return this.mode.graphical ? this.graphicsFrame() : this.textFrame();
  }

  /** Graphics modes: v86 renders its frame buffer into layers (panning, split screen) that are composed here. */
  private graphicsFrame(): Frame {
    const vga = this.vga();
    const { width, height } = this.mode as { width: number; height: number };
    this.composed = undefined;
    if (vga && width > 0 && height > 0) {
      // Everything dirty, so the whole screen is rendered now (v86 otherwise renders only what changed).
      if (vga.svga_enabled) vga.cpu.svga_mark_dirty();
      else vga.complete_replot();
      vga.screen_fill_buffer();
    }
    const frame = this.composed as Frame | undefined;
    return frame && frame.width === width && frame.height === height ? frame : { width: Math.max(width, 1), height: Math.max(height, 1), rgba: new Uint8Array(Math.max(width, 1) * Math.max(height, 1) * 4) };
  }

  private compose(layers: Layer[]): void {
    const vga = this.vga();
    if (!vga || !Array.isArray(layers)) return;
    const width = vga.screen_width;
    const height = vga.screen_height;
    if (!(width > 0 && height > 0)) return;
    if (!this.composed || this.composed.width !== width || this.composed.height !== height) {
      this.composed = { width, height, rgba: new Uint8Array(width * height * 4) };
    }
    const out = this.composed.rgba;
    for (const layer of layers) {
      const source = layer.image_data;
      if (!source?.data) continue;
      const x0 = Math.max(0, layer.screen_x);
      const x1 = Math.min(width, layer.screen_x + layer.buffer_width);
      if (x1 <= x0) continue;
      for (let y = 0; y < layer.buffer_height; y++) {
        const dy = layer.screen_y + y;
        const sy = layer.buffer_y + y;
        if (dy < 0 || dy >= height || sy < 0 || sy >= source.height) continue;
        const sx = layer.buffer_x + (x0 - layer.screen_x);
        const from = (sy * source.width + sx) * 4;
        const count = Math.min(x1 - x0, source.width - sx);
        if (count <= 0) continue;
        out.set(source.data.subarray(from, from + count * 4), (dy * width + x0) * 4);
      }
    }
    // v86 writes alpha 255; a layer that never arrived leaves black, which PNG should show opaque too.
    for (let i = 3; i < out.length; i += 4) out[i] = 255;
  }

  /** Text modes drawn with the VGA's own font from plane 2, in the guest's colours, with the cursor. */
  private textFrame(): Frame {
    const vga = this.vga();
    const clocking = vga?.clocking_mode ?? 0;
    const fontHeight = ((vga?.max_scan_line ?? 15) & 31) + 1;
    const double = (clocking & 8) !== 0;
    const nine = !double && (clocking & 1) === 0;
    const copyEighth = ((vga?.attribute_mode ?? 0) & 4) !== 0;
    const glyphWidth = nine ? 9 : 8;
    const cellWidth = double ? 16 : glyphWidth;
    const plane2 = vga?.plane2;
    // Font banks of 256 glyphs x 32 bytes; the character map select register picks two of the 8 banks.
    const bankOffset = [0, 2, 4, 6, 1, 3, 5, 7].map((slot) => slot * 8192);
    const select = vga?.character_map_select ?? 0;
    const bankA = bankOffset[((select & 0x0c) >> 2) | ((select & 0x20) >> 3)]!;
    const bankB = bankOffset[(select & 0x03) | ((select & 0x10) >> 2)]!;

    const width = this.cols * cellWidth;
    const height = this.rows * fontHeight;
    const rgba = new Uint8Array(Math.max(1, width * height) * 4);
    const put = (x: number, y: number, color: number) => {
      const at = (y * width + x) * 4;
      rgba[at] = (color >> 16) & 255;
      rgba[at + 1] = (color >> 8) & 255;
      rgba[at + 2] = color & 255;
      rgba[at + 3] = 255;
    };
    for (let row = 0; row < this.rows; row++) {
      for (let col = 0; col < this.cols; col++) {
        const cell = row * this.cols + col;
        const chr = this.chars[cell]!;
        const glyph = (this.flags[cell]! & FLAG_FONT_PAGE_B ? bankB : bankA) + chr * 32;
        const fg = this.fg[cell]!;
        const bg = this.bg[cell]!;
        for (let line = 0; line < fontHeight; line++) {
          const bits = plane2 ? plane2[glyph + line] ?? 0 : 0;
          for (let px = 0; px < glyphWidth; px++) {
            // The 9th column repeats the 8th only for the line-drawing characters 0xC0-0xDF (when enabled).
            const on = px < 8 ? (bits & (0x80 >> px)) !== 0 : copyEighth && chr >= 0xc0 && chr <= 0xdf && (bits & 1) !== 0;
            const color = on ? fg : bg;
            const x = col * cellWidth + (double ? px * 2 : px);
            put(x, row * fontHeight + line, color);
            if (double) put(x + 1, row * fontHeight + line, color);
          }
        }
      }
    }
    const { row, col } = this.cursor;
    if (this.cursorShape.visible && row < this.rows && col < this.cols) {
      const fg = this.fg[row * this.cols + col]!;
      const start = Math.min(this.cursorShape.start, fontHeight - 1);
      const end = Math.min(this.cursorShape.end, fontHeight - 1);
      for (let line = start; line <= end; line++) {
        for (let px = 0; px < cellWidth; px++) put(col * cellWidth + px, row * fontHeight + line, fg);
      }
    }
    return { width, height, rgba };
  }
}
