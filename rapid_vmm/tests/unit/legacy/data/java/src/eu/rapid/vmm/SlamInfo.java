// Same serialized form as the original VMM's class (name, serialVersionUID,
// fields); written for rapid-vmm's import tests, not the original source.
package eu.rapid.vmm;

public class SlamInfo implements java.io.Serializable {
    private static final long serialVersionUID = 1L;
    String ipv4;
    int port;
}
