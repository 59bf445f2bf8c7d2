// Stand-in for the field type of VmInfo.flavor (test data only).
package org.openstack4j.model.compute;

public interface Flavor extends java.io.Serializable {
}
