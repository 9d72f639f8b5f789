/**
 * The VGA screen as the machine Worker reports it: the text screen drawn into the page (its text is in the DOM,
 * like the serial console's), and keys typed while it has focus sent to the guest's PS/2 keyboard.
 */
import type { MachineClient } from './machine-client.js';
import type { MachineEvent } from './machine-protocol.js';

/** PC scancodes (set 1, make codes) for keys that are not text; 0xe0-prefixed ones are the extended keys. */
const SPECIAL: Record<string, number[]> = {
  Enter: [0x1c], Backspace: [0x0e], Tab: [0x0f], Escape: [0x01], Delete: [0xe0, 0x53], Insert: [0xe0, 0x52],
  ArrowUp: [0xe0, 0x48], ArrowDown: [0xe0, 0x50], ArrowLeft: [0xe0, 0x4b], ArrowRight: [0xe0, 0x4d],
  Home: [0xe0, 0x47], End: [0xe0, 0x4f], PageUp: [0xe0, 0x49], PageDown: [0xe0, 0x51],
  F1: [0x3b], F2: [0x3c], F3: [0x3d], F4: [0x3e], F5: [0x3f], F6: [0x40], F7: [0x41], F8: [0x42], F9: [0x43], F10: [0x44],
};
const LETTER_ROWS: Array<[string, number]> = [['qwertyuiop', 0x10], ['asdfghjkl', 0x1e], ['zxcvbnm', 0x2c]];
const CTRL = 0x1d;

/** Make codes followed by their break codes (the release: 0x80 set on the last byte). */
function press(make: number[], modifier?: number): number[] {
  const release = [...make.slice(0, -1), make[make.length - 1]! | 0x80];
  return modifier === undefined ? [...make, ...release] : [modifier, ...make, ...release, modifier | 0x80];
}

function letterCode(letter: string): number | undefined {
  for (const [row, first] of LETTER_ROWS) {
    const at = row.indexOf(letter);
    if (at >= 0) return first + at;
  }
  return undefined;
}

export function createScreen(element: HTMLElement, machine: MachineClient): { apply(event: MachineEvent): void } {
  const text = element.querySelector<HTMLElement>('.text')!;
  element.addEventListener('mousedown', () => element.focus());
  element.addEventListener('keydown', (event) => {
    if (event.altKey || event.metaKey) return;
    let codes: number[] | undefined;
    if (event.ctrlKey) {
      const code = event.key.length === 1 ? letterCode(event.key.toLowerCase()) : undefined;
      if (code !== undefined) codes = press([code], CTRL);
    } else if (SPECIAL[event.key]) {
      codes = press(SPECIAL[event.key]!);
    } else if (event.key.length === 1) {
      machine.keyboard_send_text(event.key);
      event.preventDefault();
      return;
    }
    if (!codes) return;
    machine.keyboard_send_scancodes(codes);
    event.preventDefault();
  });
  return {
    apply(event) {
      if (event.event !== 'screen') return;
      text.textContent = event.graphical
        ? `(The guest switched to a ${event.graphical.width}×${event.graphical.height} graphics mode, which this page does not draw; its serial console keeps working.)`
        : event.rows.map((row) => row.replace(/\s+$/, '')).join('\n');
    },
  };
}
