/**
 * JSON and "Format specific information" text the way qemu-img 7.2 prints them: four-space indentation and
 * empty containers split over two lines ("[\n    ]"), so scripts that diff qemu-img's output can diff ours.
 */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

export function qemuJson(value: JsonValue, level = 0): string {
  const pad = ' '.repeat(4 * (level + 1));
  const close = ' '.repeat(4 * level);
  if (Array.isArray(value)) {
    return `[\n${value.map((item) => pad + qemuJson(item, level + 1)).join(',\n')}${value.length ? '\n' : ''}${close}]`;
  }
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value);
    return `{\n${entries.map(([key, item]) => `${pad}${JSON.stringify(key)}: ${qemuJson(item, level + 1)}`).join(',\n')}${entries.length ? '\n' : ''}${close}}`;
  }
  return JSON.stringify(value);
}

/** qemu-img's dump_qdict: "key: value" lines, '-' in keys shown as ' ', nested containers indented by four. */
export function dumpDict(dict: { [key: string]: JsonValue }, indentation: number, out: string[]): void {
  for (const [key, value] of Object.entries(dict)) {
    const composite = value !== null && typeof value === 'object';
    out.push(`${' '.repeat(indentation * 4)}${key.replace(/-/g, ' ')}:${composite ? '' : ` ${String(value)}`}`);
    dumpValue(value, indentation + 1, out);
  }
}

function dumpValue(value: JsonValue, indentation: number, out: string[]): void {
  if (Array.isArray(value)) {
    value.forEach((item, i) => {
      const composite = item !== null && typeof item === 'object';
      out.push(`${' '.repeat(indentation * 4)}[${i}]:${composite ? '' : ` ${String(item)}`}`);
      dumpValue(item, indentation + 1, out);
    });
  } else if (value !== null && typeof value === 'object') {
    dumpDict(value, indentation, out);
  }
}
