/**
 * The serial console: xterm.js with its DOM renderer (the text is in the page, for screen readers and tests),
 * fitted to its panel, with copy and paste on Ctrl+Shift+C / Ctrl+Shift+V (plain Ctrl+C belongs to the guest).
 */
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';

export interface ConsoleView {
  terminal: Terminal;
  /** Queues guest output; it is written once per animation frame (one byte per call would be slow). */
  output(byte: number): void;
  /** Queues several bytes of guest output (the machine Worker sends them in batches). */
  write(bytes: Uint8Array): void;
  onInput(listener: (data: string) => void): void;
  /** Every line the guest printed since `clear()`, escape sequences removed (for the boot phase). */
  readonly text: string;
  clear(): void;
  focus(): void;
}

export function createConsole(container: HTMLElement): ConsoleView {
  const terminal = new Terminal({
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, monospace',
    fontSize: 14,
    scrollback: 5000,
    cursorBlink: true,
    theme: { background: '#10131a', foreground: '#e5e7eb', selectionBackground: '#3b4a6b' },
  });
  const fit = new FitAddon();
  terminal.loadAddon(fit);
  const refit = () => {
    if (container.offsetParent !== null) fit.fit();
  };
  // Opening measures the font (the browser's first text measurement sets up its font system) and builds the
  // rows: a task of its own, so that it and the page's module evaluation are two short tasks, not one long one.
  // Output written before then is buffered by xterm.js.
  setTimeout(() => {
    terminal.open(container);
    new ResizeObserver(refit).observe(container);
    refit();
  });

  terminal.attachCustomKeyEventHandler((event) => {
    if (event.type !== 'keydown' || !event.ctrlKey || !event.shiftKey) return true;
    if (event.code === 'KeyC') {
      const selection = terminal.getSelection();
      if (selection) void navigator.clipboard?.writeText(selection).catch(() => {});
      return false;
    }
    if (event.code === 'KeyV') {
      // The browser's paste event reaches xterm's textarea too; reading the clipboard here covers Ctrl+Shift+V.
      void navigator.clipboard?.readText().then((text) => terminal.paste(text), () => {});
      event.preventDefault();
      return false;
    }
    return true;
  });

  let pending: number[] = [];
  let scheduled = false;
  let text = '';
  const decoder = new TextDecoder();
  const flush = () => {
    scheduled = false;
    const bytes = Uint8Array.from(pending);
    pending = [];
    terminal.write(bytes);
    // Keep a plain-text tail for phase detection: drop CSI/OSC escapes (busybox sends ESC[6n after its prompt).
    // Stripped after joining, since one sequence can arrive split over two frames; an unfinished one at the end
    // is hidden too until the rest arrives.
    text = (text + decoder.decode(bytes, { stream: true })).replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g, '').slice(-4096);
  };

  return {
    terminal,
    output(byte) {
      pending.push(byte);
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(flush);
      }
    },
    write(bytes) {
      for (const byte of bytes) pending.push(byte);
      if (!scheduled && pending.length > 0) {
        scheduled = true;
        requestAnimationFrame(flush);
      }
    },
    onInput(listener) {
      terminal.onData(listener);
    },
    get text() {
      return text.replace(/\x1b[^A-Za-z\x07]*$/, '');
    },
    clear() {
      text = '';
      terminal.reset();
    },
    focus() {
      terminal.focus();
    },
  };
}
