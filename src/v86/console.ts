/**
 * The serial console as text a script can match: bytes from the guest decoded as UTF-8, with terminal escape
 * sequences removed (busybox ash asks for the cursor position with ESC[6n right after its prompt, and line
 * editing redraws with CSI sequences) and carriage returns dropped, so "# " and "done\n" match what a person sees.
 */

const ESC = 0x1b;

type EscapeState = 'text' | 'escape' | 'csi' | 'osc' | 'osc-escape';

export class ConsoleText {
  /** Everything printed so far, cleaned. Expect steps search from `cursor`. */
  text = '';
  cursor = 0;
  private state: EscapeState = 'text';
  private readonly decoder = new TextDecoder('utf-8');
  private readonly listeners = new Set<() => void>();

  /** Feeds raw bytes; returns the decoded (uncleaned) text for a live view such as stdout. */
  push(bytes: Uint8Array): string {
    const raw = this.decoder.decode(bytes, { stream: true });
    let clean = '';
    for (const ch of raw) {
      const code = ch.charCodeAt(0);
      switch (this.state) {
        case 'text':
          if (code === ESC) this.state = 'escape';
          else if (ch !== '\r' && ch !== '\x07' && ch !== '\x00') clean += ch;
          break;
        case 'escape':
          // ESC [ starts a CSI sequence, ESC ] an OSC string; any other ESC x is a two-character sequence.
          this.state = ch === '[' ? 'csi' : ch === ']' ? 'osc' : 'text';
          break;
        case 'csi':
          // Parameters and intermediates are 0x20-0x3f; the final byte is 0x40-0x7e.
          if (code >= 0x40 && code <= 0x7e) this.state = 'text';
          break;
        case 'osc':
          if (ch === '\x07') this.state = 'text';
          else if (code === ESC) this.state = 'osc-escape';
          break;
        case 'osc-escape':
          this.state = 'text';
          break;
      }
    }
    if (clean) {
      this.text += clean;
      for (const listener of this.listeners) listener();
    }
    return raw;
  }

  /** Calls listener after every change; returns an unsubscribe function. */
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Looks for pattern after the cursor; on a match moves the cursor past it and returns the text from the old
   * cursor to the end of the match, with the match itself.
   */
  take(pattern: string | RegExp): { text: string; match: RegExpExecArray | [string] } | undefined {
    const rest = this.text.slice(this.cursor);
    let match: RegExpExecArray | [string] | null;
    let end: number;
    if (typeof pattern === 'string') {
      const at = rest.indexOf(pattern);
      if (at < 0) return undefined;
      match = [pattern];
      end = at + pattern.length;
    } else {
      const re = new RegExp(pattern.source, pattern.flags.replace('g', '').replace('y', ''));
      match = re.exec(rest);
      if (!match) return undefined;
      end = match.index + match[0].length;
    }
    const text = rest.slice(0, end);
    this.cursor += end;
    return { text, match };
  }

  /** The last n lines printed (for error messages). */
  lastLines(n = 20): string {
    const lines = this.text.split('\n');
    return lines.slice(-n).join('\n');
  }
}
